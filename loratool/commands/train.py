"""`loratool train` (not built yet)."""

import click

from ..errors import LoratoolError


@click.command("train")
def command() -> None:
    """Not implemented yet."""
    raise LoratoolError("loratool train is not implemented yet")
