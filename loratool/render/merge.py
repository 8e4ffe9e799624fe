"""Terminal output of `loratool merge`: progress, dry-run mapping, reports."""

from __future__ import annotations

from pathlib import Path

from rich.markup import escape
from rich.table import Table

from ..io.stream import stream_json
from ..ops.merge import AdapterMergeReport, MergeReport
from .common import print_json, stdout


def _fmt_rows(rows) -> str:
    return "" if rows is None else f"[{rows[0]}:{rows[1]}]"


def checkpoint_report(report: MergeReport, as_json: bool = False) -> None:
    if as_json:
        print_json(
            {
                "schema": "loratool.merge/1",
                "output": report.out,
                "arch": report.arch,
                "naming": report.naming,
                "dry_run": report.dry_run,
                "adapters": [{"file": p, "ratio": r} for p, r in report.adapters],
                "assignments": [
                    {
                        "key": a.key, "rows": a.rows, "adapter": a.adapter, "module": a.module, "family": a.family,
                        "ratio": a.ratio, "part": a.part,
                    }  # fmt: skip
                    for a in report.assignments
                ],
                "unmapped": [{"file": p, "key": k} for p, k in report.unmapped],
                "changed_keys": len(report.changed),
                "keys_total": report.keys_total,
                "seconds": report.seconds,
                "stream": stream_json(report.stream),
            }
        )
        return
    if report.dry_run:
        # a legend, then one line per module, never truncated: ADAPTER# MODULE → KEY[ROWS] ×RATIO (FAMILY)
        for i, (path, ratio) in enumerate(report.adapters, 1):
            stdout.print(f"[dim]adapter {i}:[/] {escape(str(path))} ×{ratio:g}")
        stdout.print("[dim]ADAPTER# MODULE → BASE KEY[ROWS] ×EFFECTIVE RATIO (FAMILY)[/]")
        for a in report.assignments:
            stdout.print(
                f"{a.adapter + 1} {escape(a.module)} → {escape(a.key + _fmt_rows(a.rows))} ×{a.ratio:g} [dim]({a.family})[/]"
            )
    for path, key in report.unmapped:
        stdout.print(f"[yellow]unmapped[/] {escape(Path(path).name)}: {escape(key)}")
    verb = "would change" if report.dry_run else "changed"
    stdout.print(
        f"{len(report.assignments)} modules from {len(report.adapters)} adapter(s) {verb} {len(report.changed)} of "
        f"{report.keys_total} weights ({report.arch})"
        + ("" if report.dry_run else f" → [bold]{escape(str(report.out))}[/] in {report.seconds:.1f} s")
    )


def adapter_report(report: AdapterMergeReport, as_json: bool = False) -> None:
    if as_json:
        print_json(
            {
                "schema": "loratool.merge-lora/1",
                "output": report.out,
                "arch": report.arch,
                "mode": report.mode,
                "adapters": [{"file": p, "ratio": r} for p, r in report.adapters],
                "modules": [{"name": m.name, "rank": m.rank, "rel_error": m.rel_error} for m in report.modules],
                "max_rel_error": report.max_error,
                "seconds": report.seconds,
            }
        )
        return
    ranks = sorted({m.rank for m in report.modules})
    worst = sorted(report.modules, key=lambda m: -m.rel_error)[:5]
    if report.mode == "svd":
        table = Table(title="largest relative Frobenius errors", title_justify="left")
        table.add_column("module")
        table.add_column("rank")
        table.add_column("rel. error")
        for m in worst:
            table.add_row(m.name, str(m.rank), f"{m.rel_error:.3e}")
        stdout.print(table)
    stdout.print(
        f"{len(report.modules)} modules ({report.mode}, rank {'/'.join(map(str, ranks))}, max rel. error "
        f"{report.max_error:.2e}) → [bold]{escape(report.out)}[/]"
    )
