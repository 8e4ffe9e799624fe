"""`loratool merge` (not built yet)."""

import click

from ..errors import LoratoolError


@click.command("merge")
def command() -> None:
    """Not implemented yet."""
    raise LoratoolError("loratool merge is not implemented yet")
