"""`loratool extract` (not built yet)."""

import click

from ..errors import LoratoolError


@click.command("extract")
def command() -> None:
    """Not implemented yet."""
    raise LoratoolError("loratool extract is not implemented yet")
