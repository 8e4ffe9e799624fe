"""`loratool convert` (not built yet)."""

import click

from ..errors import LoratoolError


@click.command("convert")
def command() -> None:
    """Not implemented yet."""
    raise LoratoolError("loratool convert is not implemented yet")
