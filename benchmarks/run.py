"""Whole-process benchmarks: loratool's commands against naive in-process baselines, in one run.

    python benchmarks/run.py [--sdxl] [--keep DIR]

Generates full-size synthetic files with the real SD1.5 (and with --sdxl, SDXL) layouts — seeded,
streamed to disk — then measures, each in its own process, loratool and the naive way of doing the
same job (``safetensors.torch.load_file`` everything, work in memory, ``save_file``), and prints
wall-time and memory ratios (loratool / naive). resize and extract have their own script with
dense-SVD baselines (benchmarks/bench_resize_extract.py); run.py runs it too unless --no-lowrank.
Not part of the test suite: on this 2-core machine SD1.5 takes a few minutes, SDXL ~10 more.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import child_main, run_child, warm  # noqa: E402

HERE = Path(__file__).resolve()


# ----------------------------------------------------------------------------- steps (run in children)


def _loratool(*args: str) -> None:
    from loratool.cli import main

    rc = main(list(args))
    if rc != 0:
        raise SystemExit(rc)


def inspect_loratool(ckpt: str, lora: str, out: str) -> None:
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        _loratool("inspect", ckpt, "--json")


def inspect_naive(ckpt: str, lora: str, out: str) -> None:
    from safetensors.torch import load_file

    sd = load_file(ckpt)
    _ = {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}


def convert_loratool(ckpt: str, lora: str, out: str) -> None:
    _loratool("convert", ckpt, out, "--dtype", "bf16", "--force", "--json")


def convert_naive(ckpt: str, lora: str, out: str) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    sd = load_file(ckpt)
    save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd.items()}, out)


def merge_loratool(ckpt: str, lora: str, out: str) -> None:
    _loratool("merge", ckpt, f"{lora}:0.8", "-o", out, "--force", "--json")


def merge_naive(ckpt: str, lora: str, out: str) -> None:
    from safetensors.torch import load_file, save_file

    from loratool.adapters import apply_to_weight, load_adapter
    from loratool.source import open_file

    sd = load_file(ckpt)
    for m in load_adapter(open_file(lora)).modules.values():
        t = m.target
        w = sd[t.address]
        if t.rows is None:
            sd[t.address] = apply_to_weight(w, m, 0.8).to(w.dtype)
        else:
            a, b = t.rows
            w[a:b] = apply_to_weight(w[a:b], m, 0.8).to(w.dtype)
    save_file(sd, out)


STEPS = {f"{job}_{kind}": globals()[f"{job}_{kind}"] for job in ("inspect", "convert", "merge") for kind in ("loratool", "naive")}


# ----------------------------------------------------------------------------- driver


def _files(folder: Path, arch: str) -> tuple[Path, Path]:
    from loratool.synth import iter_lora, write_checkpoint
    from loratool.writer import save_tensors

    ckpt, lora = folder / f"{arch}-full.safetensors", folder / f"{arch}-lora-r32.safetensors"
    if not ckpt.exists():
        write_checkpoint(ckpt, arch, factor=1, seed=0, force=True)
    if not lora.exists():
        save_tensors(lora, dict(iter_lora(arch, rank=32, alpha=16.0, factor=1, seed=1)), force=True)
    return ckpt, lora


def _bench_arch(folder: Path, arch: str) -> list[tuple[str, dict, dict]]:
    ckpt, lora = _files(folder, arch)
    rows = []
    for job in ("inspect", "convert", "merge"):
        results = {}
        for kind in ("loratool", "naive"):
            out = folder / f"out-{job}-{kind}.safetensors"
            warm(str(ckpt))
            results[kind] = run_child(str(HERE), f"{job}_{kind}", str(ckpt), str(lora), str(out))
            if out.exists():
                out.unlink()
        rows.append((f"{arch} {job}", results["loratool"], results["naive"]))
        print(f"  {arch} {job}: done", file=sys.stderr)
    return rows


def _table(rows: list[tuple[str, dict, dict]]) -> str:
    lines = [
        f"{'job':16} {'loratool s':>10} {'naive s':>8} {'time ×':>7} {'peak RSS MiB':>18} {'own (anon) MiB':>18} {'anon ×':>7}",
    ]
    for name, lt, nv in rows:
        lines.append(
            f"{name:16} {lt['seconds']:10.2f} {nv['seconds']:8.2f} {lt['seconds'] / nv['seconds']:7.2f} "
            f"{lt['maxrss_mib']:8.0f} / {nv['maxrss_mib']:7.0f} {lt['anon_mib']:8.0f} / {nv['anon_mib']:7.0f} "
            f"{lt['anon_mib'] / max(nv['anon_mib'], 1):7.2f}"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", nargs="+")
    ap.add_argument("--sdxl", action="store_true", help="also benchmark the SDXL layout (~7 GB file)")
    ap.add_argument("--keep", help="work in this folder and keep the generated files")
    ap.add_argument("--no-lowrank", action="store_true", help="skip benchmarks/bench_resize_extract.py")
    args = ap.parse_args()
    if args.child:
        child_main(STEPS, args.child)
        return
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="loratool-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        rows = _bench_arch(folder, "sd1")
        if args.sdxl:
            rows += _bench_arch(folder, "sdxl")
        print(f"{os.cpu_count()} CPUs; ratios are loratool / naive (lower is better)")
        print(_table(rows))
        if not args.no_lowrank:
            sys.stdout.flush()
            subprocess.run([sys.executable, str(HERE.parent / "bench_resize_extract.py"), "--threads", "1"], check=True)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
