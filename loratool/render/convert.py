"""Rendering for `loratool convert`: a progress bar on stderr, a short summary (or JSON) on stdout."""

from __future__ import annotations

from dataclasses import asdict, is_dataclass

from rich.markup import escape
from rich.table import Table

from ..io.stream import stream_json
from .common import print_json, stdout


def report_dict(report) -> dict:
    """The report as plain data (both the convert report and the checkpoint-layout report)."""
    if hasattr(report, "to_dict"):
        return report.to_dict()
    if is_dataclass(report):
        data = asdict(report)
        for key in ("dropped", "omitted"):
            if key in data:
                reasons = sorted({r for _, r in data[key]})
                data[key] = {"count": len(data[key]), "examples": [k for k, _ in data[key][:5]], "reasons": reasons}
        if "stream" in data:  # the engine's own key names (bytes), as in every command's report
            data["stream"] = stream_json(report.stream)
        return data
    return dict(report)


def render_json(report) -> None:
    print_json({"schema": "loratool.convert/1", **report_dict(report)})


def render(report) -> None:
    """Summary table, then notes (what was dropped, clamped, refactored)."""
    data = report_dict(report)
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    out = data.get("output") or data.get("out")
    table.add_row("wrote", escape(str(out)))
    for label, key in (
        ("kind", "kind"),
        ("architecture", "arch"),
        ("container", "container_out"),
        ("naming", "naming_out"),
        ("layout", "to"),
        ("dtype", "dtype"),
    ):
        if data.get(key):
            value = data[key]
            if key == "naming_out" and data.get("naming_in"):
                value = f"{data['naming_in']} → {value}"
            if key == "container_out" and data.get("container_in"):
                value = f"{data['container_in']} → {value}"
            table.add_row(label, escape(str(value)))
    if "tensors_out" in data:
        table.add_row("tensors", f"{data['tensors_in']} in, {data['tensors_out']} out")
    elif "written" in data:
        table.add_row("tensors", f"{data['written']} written")
    pruned = data.get("pruned")
    if isinstance(pruned, dict) and pruned.get("count"):
        for reason, info in pruned["by_reason"].items():
            examples = ", ".join(info["examples"])
            table.add_row("pruned", escape(f"{info['count']} × {reason} (e.g. {examples})"))
    clamped = data.get("clamped")
    if isinstance(clamped, dict) and clamped.get("elements"):
        table.add_row("clamped", escape(f"{clamped['elements']} values in {clamped['tensors']} tensors"))
    if data.get("kept_dtype"):
        table.add_row("kept dtype", escape(f"{len(data['kept_dtype'])} schedule/EMA buffers stay float32"))
    for key in ("dropped", "omitted"):
        info = data.get(key)
        if isinstance(info, dict) and info.get("count"):
            table.add_row(key, escape(f"{info['count']} (e.g. {', '.join(info['examples'][:2])})"))
    if data.get("modules_refactored"):
        worst = data.get("max_rel_error", 0.0)
        table.add_row("refactored", f"{len(data['modules_refactored'])} modules to plain LoRA, max rel. error {worst:.2e}")
    stdout.print(table)
    for note in data.get("notes", []):
        stdout.print(f"[dim]note:[/] {escape(note)}")
