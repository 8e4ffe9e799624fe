"""FLUX.1-dev at full size: merge, convert (BFL → diffusers), resize and extract against ``cp`` of the same file.

    python benchmarks/bench_flux.py [--keep DIR] [--steps merge,convert,resize,extract] [--repeats N]

Generates a synthetic FLUX.1-dev transformer with the real BFL keys and shapes (bf16, 23.8 GB, seeded,
streamed one tensor at a time) and a rank-16 kohya LoRA on its 304 transformer modules, then measures each
step once, cold (the inputs dropped from the page cache first), each in its own process: wall seconds,
the ratio to ``cp`` + ``sync`` of the base, and peak RSS / anonymous RSS. With ``--repeats N`` the ``cp`` + ``sync``
and each chosen step run N times, interleaved (cp, merge, convert, cp, merge, ...), and medians are printed.
A naive load-everything merge
(``load_file`` the base, update in memory, ``save_file``) needs the 23.8 GB base and its 23.8 GB output in
RAM at once, ~48 GB: it cannot run on a 24 GiB machine, so it is stated, not run. Files live in a temp
folder (two 23.8 GB files at most at a time) deleted at the end unless --keep.
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
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from harness import child_main, cold, loratool, run_child  # noqa: E402

HERE = Path(__file__).resolve()


def cp_sync(base: str, lora: str, out: str) -> None:
    subprocess.run(["cp", base, out], check=True)
    subprocess.run(["sync"], check=True)


def merge(base: str, lora: str, out: str) -> None:
    loratool("merge", base, f"{lora}:0.8", "-o", out, "--force", "--json")


def convert(base: str, lora: str, out: str) -> None:
    loratool("convert", base, out, "--to", "diffusers", "--force", "--json")


def resize(base: str, lora: str, out: str) -> None:
    loratool("resize", lora, "--rank", "8", "-o", out, "--force", "--json")


def extract(base: str, tuned: str, out: str) -> None:
    loratool("extract", tuned, base, "--rank", "16", "-o", out, "--force", "--json")


STEPS = {"cp_sync": cp_sync, "merge": merge, "convert": convert, "resize": resize, "extract": extract}


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", nargs="+")
    ap.add_argument("--keep", help="work in this folder and keep the generated files")
    ap.add_argument("--factor", type=int, default=1, help="a small config instead (a smoke test of this script)")
    ap.add_argument("--steps", default="merge,extract,convert,resize", help="which steps, comma-separated")
    ap.add_argument("--repeats", type=int, default=1, help="runs of cp+sync and of each step (medians printed)")
    args = ap.parse_args()
    if args.child:
        child_main(STEPS, args.child)
        return
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="loratool-flux-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        from support.synth import make_lora, write_checkpoint

        from loratool.io.output import save_tensors

        base, lora = folder / "flux1-dev-full.safetensors", folder / "flux1-lora-r16.safetensors"
        if not base.exists():
            write_checkpoint(base, "flux1", factor=args.factor, seed=0, force=True)
        if not lora.exists():
            save_tensors(lora, make_lora("flux1", rank=16, alpha=16.0, factor=args.factor, seed=1, dtype="BF16",
                                         components=("transformer",)), force=True)
        gib = base.stat().st_size / 2**30
        rows = []

        def measure(step: str, a: Path, b: Path, out: Path, keep: bool = False) -> dict:
            cold(str(a))
            cold(str(b))
            r = run_child(str(HERE), step, str(a), str(b), str(out))
            if not keep:
                _remove(out)
            subprocess.run(["sync"], check=True)
            rows.append((step, r))
            print(f"  {step}: {r['seconds']:.1f} s", file=sys.stderr)
            return r

        steps = [s for s in args.steps.split(",") if s]
        for _ in range(args.repeats):
            measure("cp_sync", base, lora, folder / "copy.safetensors")
            merged = folder / "merged.safetensors"
            if "merge" in steps or "extract" in steps:
                measure("merge", base, lora, merged, keep="extract" in steps)
            if "extract" in steps:
                measure("extract", base, merged, folder / "extracted.safetensors")
                _remove(merged)
            if "convert" in steps:
                measure("convert", base, lora, folder / "diffusers-folder")
            if "resize" in steps:
                measure("resize", base, lora, folder / "resized.safetensors")
        by_step: dict[str, list[dict]] = {}
        for step, r in rows:
            by_step.setdefault(step, []).append(r)

        def median(values):
            v = sorted(values)
            return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2

        cp_s = median([r["seconds"] for r in by_step["cp_sync"]])
        runs = "one cold run each" if args.repeats == 1 else f"medians of {args.repeats} cold runs, interleaved"
        print(f"FLUX.1-dev transformer {gib:.1f} GiB (bf16), rank-16 kohya LoRA; {os.cpu_count()} CPUs; {runs}")
        print(f"{'step':10} {'seconds':>8} {'× cp+sync':>10} {'peak RSS MiB':>13} {'own (anon) MiB':>15}  all runs (s)")
        for step, rs in by_step.items():
            sec = median([r["seconds"] for r in rs])
            every = " ".join(f"{r['seconds']:.1f}" for r in rs)
            print(f"{step:10} {sec:8.1f} {sec / cp_s:10.2f} {max(r['maxrss_mib'] for r in rs):13.0f} "
                  f"{max(r['anon_mib'] for r in rs):15.0f}  {every}")
        print("naive load-everything merge: base + output in RAM ≈ 2 × 23.8 GB ≈ 48 GB > 24 GiB here: not run")
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
