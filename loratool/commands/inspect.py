"""`loratool inspect` (not built yet)."""

import click

from ..errors import LoratoolError


@click.command("inspect")
def command() -> None:
    """Not implemented yet."""
    raise LoratoolError("loratool inspect is not implemented yet")
