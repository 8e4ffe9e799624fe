"""Rendering of `loratool resize` / `loratool extract` results (stdout; JSON stable)."""

from __future__ import annotations

from collections import Counter

from rich.table import Table

from .common import print_json, stdout


def _rank_summary(modules) -> str:
    counts = Counter(m.rank for m in modules)
    return ", ".join(f"{n}× r{r}" for r, n in sorted(counts.items(), key=lambda rc: -rc[0]))


def _module_json(m) -> dict:
    return {
        "name": m.name,
        "kind": m.kind,
        "rank_in": m.rank_in,
        "rank": m.rank,
        "retained": round(m.retained, 6),
        "sv_max": m.sv_max,
        "sv_last": m.sv_last,
    }


def _worst_table(modules, n: int = 5) -> Table:
    table = Table(title=f"lowest retention ({min(n, len(modules))} of {len(modules)})", title_justify="left")
    for col in ("module", "kind", "rank", "retained"):
        table.add_column(col, justify="right" if col in ("rank", "retained") else "left")
    for m in sorted(modules, key=lambda m: m.retained)[:n]:
        rank = f"{m.rank_in}→{m.rank}" if m.rank_in is not None else str(m.rank)
        table.add_row(m.name, m.kind, rank, f"{m.retained:.2%}")
    return table


def render_resize(result, as_json: bool = False, verbose: bool = False) -> None:
    if as_json:
        print_json(
            {
                "schema": "loratool.resize/1",
                "output": str(result.path),
                "arch": result.arch,
                "input_naming": result.naming_in,
                "rule": result.rule,
                "average_retained": round(result.average_retained, 6),
                "modules": [_module_json(m) for m in result.modules],
            }
        )
        return
    stdout.print(f"wrote [bold]{result.path}[/] ({result.arch}, {len(result.modules)} modules, rule {result.rule})")
    stdout.print(f"ranks: {_rank_summary(result.modules)}")
    stdout.print(f"average Frobenius retention: {result.average_retained:.4%}")
    stdout.print(_worst_table(result.modules, len(result.modules) if verbose else 5))


def render_extract(result, as_json: bool = False, verbose: bool = False) -> None:
    if as_json:
        print_json(
            {
                "schema": "loratool.extract/1",
                "output": str(result.path),
                "arch": result.arch,
                "rule": result.rule,
                "svd": "exact" if result.exact else "randomized",
                "average_retained": round(result.average_retained, 6),
                "modules": [_module_json(m) for m in result.modules],
                "skipped_unchanged": list(result.skipped),
                "skipped_conv3x3": result.conv_skipped,
                "text_encoder_unchanged": result.text_encoder_unchanged,
            }
        )
        return
    svd = "exact" if result.exact else "randomized"
    stdout.print(f"wrote [bold]{result.path}[/] ({result.arch}, {len(result.modules)} modules, {svd} SVD, rule {result.rule})")
    stdout.print(f"ranks: {_rank_summary(result.modules)}")
    stdout.print(f"average Frobenius retention: {result.average_retained:.4%}")
    if result.text_encoder_unchanged:
        stdout.print("text encoder unchanged: no text-encoder modules extracted")
    if result.skipped:
        stdout.print(f"skipped {len(result.skipped)} modules whose ΔW is below --min-diff")
    if result.conv_skipped:
        stdout.print(f"left out {result.conv_skipped} 3x3 conv modules (pass --conv-rank to extract them)")
    stdout.print(_worst_table(result.modules, len(result.modules) if verbose else 5))
