"""Rich and JSON rendering of :class:`loratool.inspection.Inspection` (the only place inspect output is drawn)."""

from __future__ import annotations

from collections.abc import Sequence

from rich.markup import escape
from rich.table import Table

from ..arch import ARCH_LABELS
from ..inspection import FAMILY_LABELS, Inspection, as_dict
from .common import print_json, stdout

_TOP_TAGS = 10


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def human_count(n: int) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.2f}{suffix}"
    return str(n)


def render_json(reports: Sequence[Inspection]) -> None:
    """A JSON array with one object per file (schema in docs/inspect.md)."""
    print_json([as_dict(r) for r in reports])


def render(reports: Sequence[Inspection]) -> None:
    for i, r in enumerate(reports):
        if i:
            stdout.print()
        _render_one(r)


def _kv(table: Table, label: str, value: str) -> None:
    table.add_row(f"[bold]{escape(label)}[/]", value)


def _grid() -> Table:
    t = Table.grid(padding=(0, 2))
    t.add_column(no_wrap=True)
    t.add_column(overflow="fold")
    return t


def _render_one(r: Inspection) -> None:
    det = r.detection
    stdout.rule(f"[bold]{escape(r.path)}[/]", align="left")
    g = _grid()
    kind = {"checkpoint": "[green]checkpoint[/]", "adapter": "[cyan]adapter[/]", "other": "[yellow]other[/]"}[det.kind]
    _kv(g, "kind", f"{kind}: {escape(det.description)}")
    if det.arch:
        conf = f"{det.confidence:.2f}" if det.confidence is not None else "?"
        arch = f"{ARCH_LABELS[det.arch]} ({det.arch}), score {conf}"
        if det.forced:
            arch += " [dim](forced by --arch)[/]"
        elif det.runner_up:
            ru = det.runner_up
            arch += f"; runner-up {ru.arch}{'/' + ru.naming if ru.naming else ''} {ru.score:.2f}"
        _kv(g, "architecture", arch)
        _kv(g, "naming", escape(det.naming or "?"))
    for line in det.evidence:
        _kv(g, "evidence", f"[dim]{escape(line)}[/]")
    _kv(g, "file", f"{human_size(r.file_size)} ({r.format})")
    dts = ", ".join(f"{k} ×{v}" for k, v in r.dtypes.items())
    _kv(g, "tensors", f"{r.tensors} tensors, {human_count(r.parameters)} parameters" + (f"; {dts}" if dts else ""))
    if r.components:
        what = "modules" if det.kind == "adapter" else "keys"
        _kv(g, f"{what} by component", ", ".join(f"{c} {n}" for c, n in r.components.items()))
    a = r.adapter
    if a is not None:
        fams = ", ".join(f"{FAMILY_LABELS[f]} {n}" for f, n in a.families.items())
        extra = []
        if a.dora:
            extra.append(f"DoRA {a.dora}")
        if a.tucker:
            extra.append(f"Tucker {a.tucker}")
        _kv(g, "family", f"[bold]{escape(a.family)}[/] ({fams}{'; ' + ', '.join(extra) if extra else ''})")
        _kv(g, "layers", ", ".join(f"{k} {v}" for k, v in a.layers.items()))
        hist = "; ".join(
            f"rank {rank if rank is not None else '-'} / alpha {_alpha(al)}: {n}" for rank, al, n in a.rank_alpha
        )
        _kv(g, "rank / alpha", hist)
        if a.control:
            c = a.control
            parts = [f"LoRA biases on {c['bias_modules']} modules", f"{c['replaced']} norm scales given in full"]
            if c["img_in_width"]:
                parts.append(f"img_in takes {c['img_in_width']} inputs (merging widens a narrower base's img_in "
                             "with zero columns)")
            _kv(g, "control LoRA", escape("; ".join(parts)))
        if not a.standard_shapes:
            dims = ", ".join(f"{k} {v}" for k, v in a.shape_config.items())
            _kv(g, "shape config", f"[dim]not the released model's: {escape(dims)}[/]")
    stdout.print(g)
    if a is not None and a.unmapped:
        stdout.print(f"[bold yellow]unmapped keys ({len(a.unmapped)})[/] (other commands stop on these unless --allow-unmapped):")
        for k in a.unmapped[:20]:
            stdout.print(f"  [yellow]{escape(k)}[/]")
        if len(a.unmapped) > 20:
            stdout.print(f"  [dim](+{len(a.unmapped) - 20} more; --keys lists them all)[/]")
    _render_training(r)
    _render_triggers(r)
    _render_hashes(r)
    if r.stats is not None:
        _render_stats(r)
    if r.keys is not None:
        _render_keys(r)
    for w in r.warnings:
        stdout.print(f"[bold yellow]warning:[/] {escape(w)}")


def _alpha(a: float | None) -> str:
    return "none (= rank)" if a is None else f"{a:g}"


def _render_training(r: Inspection) -> None:
    if not r.training and not r.modelspec:
        return
    stdout.print("[bold]training[/]")
    g = _grid()
    for f in r.training:
        _kv(g, "  " + f.label, escape(f.value))
    for k, v in r.modelspec.items():
        if k == "modelspec.thumbnail":
            v = f"<{len(v)} characters>"
        _kv(g, "  " + k, escape(v if len(v) <= 200 else v[:200] + "…"))
    stdout.print(g)


def _render_triggers(r: Inspection) -> None:
    t = r.triggers
    if not (t.tags or t.folders or t.trigger_phrase):
        return
    stdout.print(f"[bold]trigger words[/]: {escape(', '.join(t.words)) or '-'}")
    g = _grid()
    if t.trigger_phrase:
        _kv(g, "  modelspec.trigger_phrase", escape(t.trigger_phrase))
    for f in t.folders:
        cls = f" (class {escape(f.class_name)})" if f.class_name else ""
        _kv(g, "  folder", f"{escape(f.folder)}: trigger [bold]{escape(f.identifier)}[/]{cls}, {f.repeats} repeats")
    if t.tags:
        top = ", ".join(f"{escape(x.tag)} {x.share:.0%}" for x in t.tags[:_TOP_TAGS])
        more = f" [dim](+{len(t.tags) - _TOP_TAGS} more)[/]" if len(t.tags) > _TOP_TAGS else ""
        _kv(g, "  tags", f"{top}{more} [dim]of {t.images} images[/]")
    stdout.print(g)


def _match(m: bool | None) -> str:
    return {True: "[green]matches[/]", False: "[bold red]does not match[/]", None: "[dim]not checked[/]"}[m]


def _render_hashes(r: Inspection) -> None:
    h = r.hashes
    if h is None:
        stdout.print(f"[bold]hashes[/]: [dim]{escape(r.hash_note)}[/]")
        return
    stdout.print("[bold]hashes[/]")
    rows = [("sha256", h.sha256), ("AutoV2", h.autov2)]
    if h.addnet:
        rows.append(("addnet (AutoV3)", f"{h.addnet_short} [dim](full: {h.addnet})[/]"))
    rows.append(("legacy", h.legacy))
    if h.stored_model is not None:
        rows.append(("sshs_model_hash", f"{h.stored_model[:12]}… {_match(h.model_match)}"))
    if h.stored_legacy is not None:
        rows.append(("sshs_legacy_hash", f"{h.stored_legacy} {_match(h.legacy_match)}"))
    width = max(len(label) for label, _ in rows)
    for label, value in rows:  # one line each, never wrapped (a hash is copied whole)
        stdout.print(f"  [bold]{escape(label.ljust(width))}[/]  {value}", soft_wrap=True)


def _render_stats(r: Inspection) -> None:
    s = r.stats
    assert s is not None
    bad = len(s.nonfinite)
    status = "[green]all finite[/]" if not bad else f"[bold red]{bad} tensors with NaN/Inf[/]"
    stdout.print(f"[bold]stats[/]: {s.tensors_checked} tensors checked, {status}")
    if s.blocks:
        t = Table(title="effective ΔW norm per block (alpha applied)", title_justify="left")
        t.add_column("block")
        t.add_column("modules", justify="right")
        t.add_column("‖ΔW‖", justify="right")
        for b in s.blocks:
            t.add_row(escape(b.block), str(b.modules), f"{b.norm:.4g}")
        stdout.print(t)


def _render_modules(r: Inspection) -> None:
    t = Table(title=f"modules ({len(r.modules)})", title_justify="left")
    for col in ("module", "family", "layer", "rank", "alpha", "flags"):
        justify = "right" if col in ("rank", "alpha") else "left"
        t.add_column(col, overflow="fold" if col == "module" else "ellipsis", justify=justify)
    for m in r.modules:
        flags = " ".join(f for f, on in (("DoRA", m.dora), ("Tucker", m.tucker)) if on)
        rank = str(m.rank) if m.rank is not None else "-"
        t.add_row(escape(m.name), FAMILY_LABELS[m.family], m.layer, rank, _alpha(m.alpha) if m.alpha is not None else "-", flags)
    stdout.print(t)


def _render_keys(r: Inspection) -> None:
    if r.adapter is not None and r.modules:
        _render_modules(r)
    t = Table(title=f"keys ({len(r.keys or ())})", title_justify="left")
    t.add_column("key", overflow="fold")
    t.add_column("shape")
    t.add_column("dtype")
    t.add_column("maps to", overflow="fold")
    for k in r.keys or ():
        where = "[yellow]unmapped[/]" if k.maps_to == "unmapped" else escape(k.maps_to)
        t.add_row(escape(k.key), "×".join(map(str, k.shape)) or "scalar", k.dtype, where)
    stdout.print(t)
