"""GPU check: merge, resize and extract with ``--device cuda`` against ``--device cpu``, full size, in one run.

    python benchmarks/bench_gpu.py [--arch sdxl] [--factor 1] [--gpu cuda] [--dir DIR] [--json FILE]

Meant for one call on a machine with a CUDA GPU (it needs nothing but this checkout, torch, safetensors,
numpy, click and rich: ``PYTHONPATH=. python3 benchmarks/bench_gpu.py --json $OUT/gpu.json``). It generates
full-size synthetic files of ``--arch`` there (seeded, streamed: a base checkpoint, a rank-32 and a rank-128
kohya LoRA), then runs each command once per device, each in its own process (wall seconds of the whole
command, CUDA start included; peak RSS), and checks that the GPU outputs equal the CPU outputs:

* ``merge`` the rank-32 LoRA at 0.8, in the base's dtype (fp16: every element equal or one fp16 step apart,
  as float32 results that differ in their last bits can round to neighbouring fp16 values) and with
  ``--dtype fp32`` (float32 tolerance: relative Frobenius error per tensor ≤ 1e-5);
* ``resize`` the rank-128 LoRA to 32 and ``extract`` rank 32 from (the CPU fp16 merge, the base), both
  written in fp32: per module, ``up·down·alpha/rank`` of the GPU output against the CPU output (relative
  Frobenius error ≤ 1e-4: truncated factorizations move with the gap between the 32nd and 33rd singular
  values). The extract is also compared with the planted ``0.8·ΔW`` of the LoRA it was merged from.

``--gpu cpu`` runs the same script with the CPU on both sides (a self-test of the script, here: two
runs, two sets of files, compared the same way).
``--factor N`` divides every width by N (a small run). Results are printed as one table and, with
``--json``, written after every step (a run cut short still leaves what it measured). Files live in a
temp folder (inside ``--dir`` if given), deleted at the end. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # support.synth: the file generator

from harness import child_main, compare_checkpoints, loratool, run_child  # noqa: E402

HERE = Path(__file__).resolve()
RATIO, RANK, RANK_IN = 0.8, 32, 128
TOL_MERGE_FP32, TOL_LOWRANK = 1e-5, 1e-4


# ----------------------------------------------------------------------------- steps (run in children)


def setup(d: str, arch: str, factor: str) -> dict:
    from support.synth import iter_lora, write_checkpoint

    from loratool.io.output import save_tensors

    p, f = Path(d), int(factor)
    start = time.perf_counter()
    write_checkpoint(p / "base.safetensors", arch, factor=f, seed=0, force=True)
    save_tensors(p / "lora32.safetensors", dict(iter_lora(arch, rank=RANK, alpha=16.0, factor=f, seed=1)), force=True)
    save_tensors(p / "lora128.safetensors", dict(iter_lora(arch, rank=RANK_IN, alpha=64.0, factor=f, seed=7)),
                 force=True)
    return {"generated_s": round(time.perf_counter() - start, 1), "base_bytes": (p / "base.safetensors").stat().st_size}


def merge(d: str, side: str, device: str, dtype: str) -> None:
    p = Path(d)
    extra = [] if dtype == "base" else ["--dtype", dtype]
    loratool("merge", str(p / "base.safetensors"), f"{p / 'lora32.safetensors'}:{RATIO}",
              "-o", str(p / f"merged-{side}-{dtype}.safetensors"), "--device", device, *extra, "--force", quiet=True)


def resize(d: str, side: str, device: str) -> None:
    p = Path(d)
    loratool("resize", str(p / "lora128.safetensors"), "-o", str(p / f"resized-{side}.safetensors"),
              "--rank", str(RANK), "--device", device, "--dtype", "fp32", "--force", quiet=True)


def extract(d: str, side: str, device: str) -> None:
    p = Path(d)
    loratool("extract", str(p / "merged-cpu-base.safetensors"), str(p / "base.safetensors"),
              "-o", str(p / f"extracted-{side}.safetensors"), "--rank", str(RANK), "--device", device,
              "--dtype", "fp32", "--force", quiet=True)


def gpu_name(device: str) -> dict:
    import torch

    info = {"torch": torch.__version__, "cpus": os.cpu_count(), "python": platform.python_version()}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


STEPS = {"setup": setup, "merge": merge, "resize": resize, "extract": extract, "gpu_name": gpu_name}


# ----------------------------------------------------------------------------- comparisons (this process)


def _modules(src) -> dict[str, str]:
    """kohya module name → its lora_down key."""
    return {k.removesuffix(".lora_down.weight"): k for k in src.keys() if k.endswith(".lora_down.weight")}


def _product(src, name: str):
    """float64 ``up·down·alpha/rank`` (flattened) of one kohya module, from the raw tensors."""
    down = src.get(f"{name}.lora_down.weight").double()
    up = src.get(f"{name}.lora_up.weight").double()
    down, up = down.reshape(down.shape[0], -1), up.reshape(up.shape[0], -1)
    alpha = float(src.get(f"{name}.alpha")) if f"{name}.alpha" in src.keys() else down.shape[0]
    return up @ down * (alpha / down.shape[0])


def compare_loras(a: Path, b: Path, planted: Path | None = None, ratio: float = 1.0) -> dict:
    """Per module, ‖P_a − P_b‖/‖P_b‖ of the products (one module in memory at a time); with ``planted``, also
    ``a`` against ratio·P_planted."""
    import torch

    from loratool.io.source import open_file

    def rel(x, y) -> float:
        return float(torch.linalg.vector_norm(x - y) / torch.linalg.vector_norm(y))

    with open_file(a) as sa, open_file(b) as sb:
        names = _modules(sa)
        if sorted(names) != sorted(_modules(sb)):
            return {"error": f"different modules: {len(names)} against {len(_modules(sb))}"}
        worst, against = 0.0, []
        with open_file(planted or b) as sp:
            planted_names = _modules(sp) if planted is not None else {}
            for n in names:
                pa = _product(sa, n)
                worst = max(worst, rel(pa, _product(sb, n)))
                if n in planted_names:
                    against.append(rel(pa, ratio * _product(sp, n)))
    result: dict = {"modules": len(names), "max_rel_fro": worst}
    if planted is not None:
        against.sort()
        result["planted_modules_found"] = len(against)
        if against:
            result["vs_planted_median"], result["vs_planted_max"] = against[len(against) // 2], against[-1]
    return result


# ----------------------------------------------------------------------------- driver


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", nargs="+")
    ap.add_argument("--arch", default="sdxl", choices=["sd1", "sd2", "sdxl"])
    ap.add_argument("--factor", type=int, default=1, help="divide every width by N (1: full size)")
    ap.add_argument("--gpu", default="cuda", help="the device to check against the CPU (cpu: self-test)")
    ap.add_argument("--dir", help="make the temp folder here (default: the system's temp folder)")
    ap.add_argument("--json", help="write the results here, after every step")
    args = ap.parse_args()
    if args.child:
        child_main(STEPS, args.child)
        return
    if args.dir:
        Path(args.dir).mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix="loratool-gpu-", dir=args.dir))  # ours alone: deleted at the end
    gpu = args.gpu
    results: dict = {"schema": "loratool.bench_gpu/1", "arch": args.arch, "factor": args.factor, "device": gpu,
                     "steps": {}, "checks": {}}

    def save() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))

    def step(label: str, *argv: str) -> dict:
        r = run_child(str(HERE), *argv)
        results["steps"][label] = {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}
        print(f"{label:24} {r['seconds']:8.2f} s  peak RSS {r['maxrss_mib']:7.0f} MiB", flush=True)
        save()
        return r

    def check(label: str, outcome: dict, ok: bool) -> None:
        outcome["pass"] = bool(ok and "error" not in outcome)
        results["checks"][label] = outcome
        print(f"check {label:18} {'PASS' if outcome['pass'] else 'FAIL'}  {json.dumps(outcome)}", flush=True)
        save()

    try:
        info = run_child(str(HERE), "gpu_name", gpu)
        results["machine"] = {k: info[k] for k in ("gpu", "torch", "cpus", "python") if k in info}
        print(json.dumps(results["machine"]), flush=True)
        step("setup", "setup", str(d), args.arch, str(args.factor))
        sides = (("cpu", "cpu"), ("gpu", gpu))  # (file label, --device): distinct files even in the self-test
        for dtype in ("base", "fp32"):
            for side, dev in sides:
                step(f"merge {dtype} {side}", "merge", str(d), side, dev, dtype)
            c = compare_checkpoints(d / f"merged-gpu-{dtype}.safetensors", d / f"merged-cpu-{dtype}.safetensors")
            ok = c.get("max_ulp", 99) <= 1 if dtype == "base" else c.get("max_rel_fro", 1.0) <= TOL_MERGE_FP32
            check(f"merge {dtype}", c, ok)
            (d / f"merged-gpu-{dtype}.safetensors").unlink()
            if dtype == "fp32":
                (d / "merged-cpu-fp32.safetensors").unlink()
        for side, dev in sides:
            step(f"resize {side}", "resize", str(d), side, dev)
        c = compare_loras(d / "resized-gpu.safetensors", d / "resized-cpu.safetensors")
        check("resize", c, c.get("max_rel_fro", 1.0) <= TOL_LOWRANK)
        for side, dev in sides:
            step(f"extract {side}", "extract", str(d), side, dev)
        c = compare_loras(d / "extracted-gpu.safetensors", d / "extracted-cpu.safetensors",
                          planted=d / "lora32.safetensors", ratio=RATIO)
        check("extract", c, c.get("max_rel_fro", 1.0) <= TOL_LOWRANK)
        for job in ("merge base", "merge fp32", "resize", "extract"):
            c, g = results["steps"][f"{job} cpu"]["seconds"], results["steps"][f"{job} gpu"]["seconds"]
            print(f"{job:12} cpu {c:8.2f} s   {gpu} {g:8.2f} s   ×{c / g:.1f} faster")
        print("all checks pass" if all(c["pass"] for c in results["checks"].values()) else "SOME CHECKS FAIL")
    finally:
        shutil.rmtree(d, ignore_errors=True)
        subprocess.run(["sync"], check=False)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
