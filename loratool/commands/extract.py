"""`loratool extract TUNED BASE -o OUT --rank N`: a kohya LoRA from a fine-tune's difference to its base."""

from __future__ import annotations

from pathlib import Path

import click

from . import options as opt
from .resize import RULE_HELP, parse_rule_option


@click.command("extract")
@click.argument("tuned", type=click.Path(path_type=Path, exists=True))
@click.argument("base", type=click.Path(path_type=Path, exists=True))
@opt.output("Output LoRA: .safetensors, or .ckpt/.pt/.pth/.bin for a torch pickle.")
@click.option("--rank", required=True, type=int, help="Rank of linear / 1x1 modules (the largest rank for dynamic rules).")
@click.option("--conv-rank", type=int, help="Rank of 3x3 conv modules; without it they are left out (kohya's default).")
@click.option("--rule", default="fixed", callback=parse_rule_option, help=RULE_HELP)
@click.option("--clamp-quantile", "clamp", type=float, help="Clamp factors to this quantile of |value| (e.g. 0.99).")
@click.option("--min-diff", default=0.0, show_default=True, type=float, help="Skip modules whose max |ΔW| is at most this.")
@click.option("--exact", is_flag=True, help="Exact SVD instead of the seeded randomized SVD.")
@click.option("--all-layers", is_flag=True, help="Every adaptable Linear/Conv, not only kohya's default network.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the randomized SVD.")
@opt.device("Where ΔW and the SVDs live (float32): auto picks CUDA when available.")
@click.option("--dtype", "dtype", type=opt.DtypeParam(), default="fp16", show_default=True, help="Output dtype of the factors.")
@opt.arch()
@opt.force()
@opt.json_output("loratool.extract/1")
@click.option("-v", "--verbose", is_flag=True, help="List every module's retention, not only the 5 lowest.")
def command(
    tuned, base, out, rank, conv_rank, rule, clamp, min_diff, exact, all_layers, seed, device, dtype, arch, force, as_json,
    verbose,
) -> None:
    """Extract a LoRA from TUNED − BASE (full checkpoints: single file or diffusers folder).

    Reads one weight pair at a time; alpha = rank (kohya's convention); ss_* and modelspec
    metadata and sshs hashes are written.
    """
    from ..ops.extract import extract_lora
    from ..render.common import progress_bar
    from ..render.lowrank import render_extract

    with progress_bar(f"extracting {tuned.name}", not as_json) as on_progress:
        result = extract_lora(
            tuned, base, out, rank, conv_rank, rule, clamp, min_diff, exact, all_layers, device, arch, dtype, force,
            seed=seed, on_progress=on_progress,
        )
    render_extract(result, as_json, verbose)
