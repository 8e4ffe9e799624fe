"""`loratool demo` (not built yet)."""

import click

from ..errors import LoratoolError


@click.command("demo")
def command() -> None:
    """Not implemented yet."""
    raise LoratoolError("loratool demo is not implemented yet")
