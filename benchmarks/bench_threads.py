"""Benchmark: commands next to a concurrent CPU job (issue: OpenMP threads spinning against each other).

    python benchmarks/bench_threads.py [--repeats 3] [--keep DIR]

For each job (SD1.5 rank-128 → 32 resize, rank-32 extract from two full-size SD1.5 files, merge of a
rank-32 LoRA into SD1.5) it runs the whole ``loratool`` command in a fresh process

* ``alone``      with loratool's own thread policy, nothing else running;
* ``1 thread``   with ``OMP_NUM_THREADS=1`` (torch then uses one thread everywhere), nothing else running;
* ``loaded``     with loratool's policy while a load process (a torch matmul loop on all cores, started
                 and stopped by this script) computes beside it;
* ``loaded, before``  the same with ``LORATOOL_THREADS=all`` and libgomp's default spinning waits
                 (the behaviour before the thread policy and ``OMP_WAIT_POLICY=PASSIVE``),

and prints medians and the ratio ``loaded / 1 thread`` (target ≤ 2). Files go to a temp folder that is
deleted at the end unless ``--keep``. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LOAD = """
import torch
a = torch.randn(1024, 1024)
while True:
    a = torch.tanh(a @ a)
"""


def _setup(p: Path) -> None:
    from support.synth import iter_lora, write_checkpoint

    from loratool.io.output import save_tensors

    if not (p / "lora128.safetensors").exists():
        save_tensors(p / "lora128.safetensors", dict(iter_lora("sd1", rank=128, alpha=64, factor=1, seed=7)), force=True)
        save_tensors(p / "lora32.safetensors", dict(iter_lora("sd1", rank=32, alpha=16, factor=1, seed=8)), force=True)
        write_checkpoint(p / "base.safetensors", "sd1", factor=1, seed=1, force=True)
        write_checkpoint(p / "tuned.safetensors", "sd1", factor=1, seed=2, force=True)


def _jobs(p: Path) -> dict[str, list[str]]:
    return {
        "resize r128→32": ["resize", str(p / "lora128.safetensors"), "--rank", "32", "-o", str(p / "out-r.safetensors"),
                           "--device", "cpu"],
        "extract r32": ["extract", str(p / "tuned.safetensors"), str(p / "base.safetensors"), "--rank", "32",
                        "-o", str(p / "out-e.safetensors"), "--device", "cpu"],
        "merge r32": ["merge", str(p / "base.safetensors"), str(p / "lora32.safetensors"), "-o", str(p / "out-m.safetensors"),
                      "--device", "cpu"],
    }


def _run(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "loratool", *argv, "--force", "--json"], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keep", type=Path)
    ap.add_argument("--jobs", nargs="*", help="substring filter on job names")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="loratool-threads-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        _setup(work)
        base_env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LORATOOL_THREADS", "OMP_WAIT_POLICY")}
        modes = {
            "alone": (base_env, False),
            "1 thread": ({**base_env, "OMP_NUM_THREADS": "1"}, False),
            "loaded": (base_env, True),
            # torch's pool everywhere and libgomp's default spin-then-sleep waits: the behaviour before the policy
            # (an empty OMP_WAIT_POLICY is ignored by libgomp and keeps loratool from setting PASSIVE)
            "loaded, before": ({**base_env, "LORATOOL_THREADS": "all", "OMP_WAIT_POLICY": ""}, True),
        }
        print(f"{os.cpu_count()} CPUs; median of {args.repeats}; whole command, seconds")
        print(f"{'job':<16}" + "".join(f"{m:>26}" for m in modes) + f"{'loaded / 1 thread':>20}")
        for job, argv in _jobs(work).items():
            if args.jobs and not any(s in job for s in args.jobs):
                continue
            med = {}
            for mode, (env, loaded) in modes.items():
                load = subprocess.Popen([sys.executable, "-c", LOAD]) if loaded else None
                try:
                    if load:
                        time.sleep(1.0)
                    times = [_run(argv, env) for _ in range(args.repeats)]
                finally:
                    if load:
                        load.kill()
                        load.wait()
                med[mode] = statistics.median(times)
            ratio = med["loaded"] / med["1 thread"]
            print(f"{job:<16}" + "".join(f"{med[m]:>26.2f}" for m in modes) + f"{ratio:>20.2f}", flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # support.synth
    main()
