"""`loratool sample` (not built yet)."""

import click

from ..errors import LoratoolError


@click.command("sample")
def command() -> None:
    """Not implemented yet."""
    raise LoratoolError("loratool sample is not implemented yet")
