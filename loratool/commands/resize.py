"""`loratool resize` (not built yet)."""

import click

from ..errors import LoratoolError


@click.command("resize")
def command() -> None:
    """Not implemented yet."""
    raise LoratoolError("loratool resize is not implemented yet")
