"""`loratool resize LORA -o OUT --rank N`: new ranks from the exact SVD of each module's factors."""

from __future__ import annotations

from pathlib import Path

import click

from . import options as opt

RULE_HELP = (
    "Rank rule: fixed (default), sv_ratio:X (keep σ ≥ σmax/X), sv_fro:X (keep share X of the Frobenius norm), "
    "sv_cumulative:X (share X of Σσ), size:MB or params:N (one budget for the whole file). --rank caps every rule."
)


def parse_rule_option(ctx, param, value):
    from ..ops.lowrank import parse_rule

    return parse_rule(value)


@click.command("resize")
@click.argument("lora", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@opt.output("Output LoRA: .safetensors, or .ckpt/.pt/.pth/.bin for a torch pickle.")
@click.option("--rank", required=True, type=int, help="New rank (the largest rank for dynamic rules).")
@click.option("--conv-rank", type=int, help="New rank of 3x3 conv modules (default: --rank).")
@click.option("--rule", default="fixed", callback=parse_rule_option, help=RULE_HELP)
@opt.device("Where the SVDs run (float32): auto picks CUDA when available.")
@opt.dtype("Output dtype of the factors. [default: the input's]")
@opt.arch()
@opt.force()
@opt.json_output("loratool.resize/1")
@click.option("-v", "--verbose", is_flag=True, help="List every module's retention, not only the 5 lowest.")
def command(lora, out, rank, conv_rank, rule, device, dtype, arch, force, as_json, verbose) -> None:
    """Resize LORA to a new rank. ΔW = up·down is decomposed exactly from the factors
    (QR of both, SVD of the small core), the new factors carry √σ each, and alpha is rescaled
    so alpha/rank stays the same. Writes kohya module names; metadata and sshs hashes are updated.
    """
    from ..ops.resize import resize_lora
    from ..render.common import progress_bar
    from ..render.lowrank import render_resize

    with progress_bar(f"resizing {lora.name}", not as_json) as on_progress:
        result = resize_lora(
            lora, out, rank, conv_rank, rule, device=device, dtype=dtype, arch=arch, force=force, on_progress=on_progress,
        )
    render_resize(result, as_json, verbose)
