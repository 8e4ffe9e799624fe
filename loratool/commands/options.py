"""Options shared by every command, spelled and parsed one way: -o/--output, --device, --dtype, --arch,
--force, --json. Commands stack these decorators instead of declaring their own copies."""

from __future__ import annotations

from pathlib import Path

import click

from ..dtypes import CHOICES
from ..runtime import DEVICES

ARCH_CHOICES = ("sd1", "sd2", "sdxl", "flux1")


class DtypeParam(click.Choice):
    """``--dtype``: one of :data:`loratool.dtypes.CHOICES` (case-insensitive), converted to the
    safetensors dtype name (``fp16`` → ``F16``)."""

    name = "dtype"

    def __init__(self) -> None:
        super().__init__(CHOICES, case_sensitive=False)

    def convert(self, value, param, ctx):
        from ..dtypes import parse_cli

        return parse_cli(super().convert(value, param, ctx))


def output(help: str, required: bool = True):
    return click.option("-o", "--output", "out", required=required, type=click.Path(path_type=Path), help=help)


def device(help: str = "Where the math runs (float32): auto picks CUDA when available."):
    return click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True, help=help)


def dtype(help: str, *aliases: str):
    return click.option("--dtype", *aliases, "dtype", type=DtypeParam(), help=help)


def arch(help: str = "Force the architecture instead of detecting it."):
    return click.option("--arch", type=click.Choice(ARCH_CHOICES), help=help)


def force(help: str = "Replace OUT if it exists (never an input)."):
    return click.option("--force", is_flag=True, help=help)


def json_output(schema: str):
    return click.option("--json", "as_json", is_flag=True, help=f"Print the report as stable JSON on stdout (schema {schema}).")
