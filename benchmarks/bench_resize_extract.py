"""Benchmark: resize a rank-128 SD1.5 LoRA to 32, and extract a rank-32 LoRA from two full-size SD1.5 files.

    python benchmarks/bench_resize_extract.py [--keep DIR] [--sample N] [--threads T]

Each step runs in its own subprocess and reports wall time, peak RSS (``VmHWM``, which also counts
resident pages of memory-mapped inputs) and peak anonymous RSS (``RssAnon`` sampled every 5 ms).

Baselines are the naive way: form the dense ΔW (``up @ down`` for resize, ``tuned − base`` for extract)
and run a full ``torch.linalg.svd``. Dense SVDs of every module would take far too long on a 2-core machine,
so the baseline times one module per distinct ΔW shape (or ``--sample`` shapes spread over the size order)
and extrapolates: total = Σ over shapes of (modules with that shape × time of its sample); a shape not timed
is estimated from the median time per m·n·min(m, n) of the timed ones.
The extract baseline also gives the exact rank-32 Frobenius retention of the sampled modules, compared with
what the randomized SVD kept for the same modules. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # support.synth: the file generator

from harness import measured  # noqa: E402

RANK_IN, RANK_OUT = 128, 32


def _shape_groups(shapes: dict[str, tuple[int, int]]) -> dict[tuple[int, int], list[str]]:
    """Distinct flattened ΔW shape → module names, largest shape first."""
    groups: dict[tuple[int, int], list[str]] = {}
    for name, shape in sorted(shapes.items()):
        groups.setdefault(shape, []).append(name)
    return {s: groups[s] for s in sorted(groups, key=lambda s: -(s[0] * s[1]))}


def _pick(groups: dict[tuple[int, int], list[str]], sample: int | None) -> list[tuple[int, int]]:
    """``sample`` shapes spread evenly over the size order (largest and smallest included); all when None."""
    shapes = list(groups)
    if not sample or sample >= len(shapes):
        return shapes
    if sample == 1:
        return shapes[:1]
    idx = sorted({round(i * (len(shapes) - 1) / (sample - 1)) for i in range(sample)})
    return [shapes[i] for i in idx]


def _extrapolate(groups: dict[tuple[int, int], list[str]], timed: dict[tuple[int, int], float]) -> float:
    """Σ modules × seconds; untimed shapes use the median seconds per m·n·min(m, n) of the timed ones."""
    rates = sorted(sec / (m * n * min(m, n)) for (m, n), sec in timed.items())
    rate = rates[len(rates) // 2]
    total = 0.0
    for (m, n), names in groups.items():
        total += len(names) * timed.get((m, n), rate * m * n * min(m, n))
    return total


def _resize_dense(lora: str, sample: int | None) -> dict:
    import torch

    from loratool.adapters import load_adapter, scale_of
    from loratool.io.source import open_file

    with open_file(lora) as src:
        mods = load_adapter(src).modules
    flat = {n: (m.tensors["up"].shape[0], m.tensors["down"][0].numel()) for n, m in mods.items()}
    groups = _shape_groups(flat)
    timed = _pick(groups, sample)
    rows, secs = [], {}
    for shape in timed:
        m = mods[groups[shape][0]]
        t = {k: v.float() for k, v in m.tensors.items()}
        start = time.perf_counter()
        dense = t["up"].reshape(shape[0], -1) @ t["down"].reshape(t["down"].shape[0], -1) * scale_of("lora", t)
        torch.linalg.svd(dense, full_matrices=False)
        dt = time.perf_counter() - start
        rows.append({"shape": list(shape), "modules": len(groups[shape]), "seconds": round(dt, 4)})
        secs[shape] = dt
    total = _extrapolate(groups, secs)
    return {"extrapolated_seconds": round(total, 2), "shapes_timed": len(timed), "shapes": len(groups), "rows": rows}


def _extract_dense(tuned: str, base: str, sample: int | None) -> dict:
    import torch

    from loratool.arch import kohya_modules
    from loratool.io.source import open_file
    from loratool.ops.extract import _rows
    from loratool.ops.lowrank import retention

    targets = {n: t for n, t in kohya_modules("sd1").items() if t.kind != "conv3x3"}
    flat = {}
    for n, t in targets.items():
        ts = t.target_shape
        flat[n] = (ts[0], int(torch.tensor(ts[1:]).prod()))
    groups = _shape_groups(flat)
    timed = _pick(groups, sample)
    rows, secs = [], {}
    with open_file(tuned) as ts, open_file(base) as bs:
        for shape in timed:
            t = targets[groups[shape][0]]
            start = time.perf_counter()
            d = _rows(ts.get(t.address), t).float() - _rows(bs.get(t.address), t).float()
            s = torch.linalg.svd(d.reshape(d.shape[0], -1), full_matrices=False)[1]
            dt = time.perf_counter() - start
            rows.append(
                {
                    "shape": list(shape),
                    "module": t.name,
                    "modules": len(groups[shape]),
                    "seconds": round(dt, 4),
                    "exact_retained": retention(s, RANK_OUT),
                }
            )
            secs[shape] = dt
    total = _extrapolate(groups, secs)
    return {"extrapolated_seconds": round(total, 2), "shapes_timed": len(timed), "shapes": len(groups), "rows": rows}


def _child(step: str, d: str, sample: int | None, threads: int | None) -> None:
    import torch  # (import cost outside the timed region)

    if threads:
        torch.set_num_threads(threads)
    with measured() as m:
        extra = _step(step, Path(d), sample)
    print(json.dumps({"step": step, "seconds": round(m["seconds"], 2), "peak_rss_mib": int(m["maxrss_mib"]),
                      "peak_anon_mib": int(m["anon_mib"]), **extra}))


def _step(step: str, p: Path, sample: int | None) -> dict:
    extra: dict = {}
    if step == "setup" and (p / "tuned.safetensors").exists():
        extra = {"note": "files kept from an earlier run (--keep)"}
    elif step == "setup":
        from support.synth import iter_lora, write_checkpoint

        from loratool.io.output import save_tensors

        save_tensors(p / "lora128.safetensors", dict(iter_lora("sd1", rank=RANK_IN, alpha=64, factor=1, seed=7)), force=True)
        write_checkpoint(p / "base.safetensors", "sd1", factor=1, seed=1, force=True)
        write_checkpoint(p / "tuned.safetensors", "sd1", factor=1, seed=2, force=True)
    elif step == "resize":
        from loratool.ops.resize import resize_lora

        r = resize_lora(p / "lora128.safetensors", p / "lora32.safetensors", RANK_OUT, device="cpu", force=True)
        extra = {"modules": len(r.modules), "average_retained": round(r.average_retained, 4)}
    elif step == "resize_dense":
        extra = _resize_dense(str(p / "lora128.safetensors"), sample)
    elif step == "extract":
        from loratool.ops.extract import extract_lora

        r = extract_lora(p / "tuned.safetensors", p / "base.safetensors", p / "extract32.safetensors", RANK_OUT,
                         device="cpu", force=True)
        extra = {
            "modules": len(r.modules),
            "average_retained": round(r.average_retained, 4),
            "retained": {m.name: m.retained for m in r.modules},
        }
    elif step == "extract_dense":
        extra = _extract_dense(str(p / "tuned.safetensors"), str(p / "base.safetensors"), sample)
    return extra


def _run(step: str, d: Path, sample: int | None, threads: int | None) -> dict:
    cmd = [sys.executable, __file__, "--child", step, "--dir", str(d)]
    if sample:
        cmd += ["--sample", str(sample)]
    if threads:
        cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child")
    ap.add_argument("--dir")
    ap.add_argument("--keep", help="work in this folder and keep the files")
    ap.add_argument("--sample", type=int, help="time the dense baseline on N distinct shapes only")
    ap.add_argument("--threads", type=int, help="torch threads per step (1 avoids OpenMP spin-waits on a busy machine)")
    args = ap.parse_args()
    if args.child:
        _child(args.child, args.dir, args.sample, args.threads)
        return
    d = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_rx_"))
    d.mkdir(parents=True, exist_ok=True)
    try:
        results = {}
        for step in ("setup", "resize", "resize_dense", "extract", "extract_dense"):
            results[step] = r = _run(step, d, args.sample, args.threads)
            brief = {k: v for k, v in r.items() if k not in ("rows", "retained")}
            print(json.dumps(brief), flush=True)
        for row in results["extract_dense"]["rows"]:
            row["randomized_retained"] = results["extract"]["retained"][row["module"]]
            print(json.dumps(row))
        for row in results["resize_dense"]["rows"]:
            print(json.dumps(row))
        rs, rd = results["resize"], results["resize_dense"]
        es, ed = results["extract"], results["extract_dense"]
        print(f"resize {RANK_IN}→{RANK_OUT}: {rs['seconds']} s vs dense SVD ≈{rd['extrapolated_seconds']} s "
              f"(×{rd['extrapolated_seconds'] / rs['seconds']:.1f}); peak RSS {rs['peak_rss_mib']} MiB")
        print(f"extract rank {RANK_OUT}: {es['seconds']} s vs dense SVD ≈{ed['extrapolated_seconds']} s "
              f"(×{ed['extrapolated_seconds'] / es['seconds']:.1f}); peak RSS {es['peak_rss_mib']} MiB, "
              f"anon {es['peak_anon_mib']} MiB")
    finally:
        if not args.keep:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
