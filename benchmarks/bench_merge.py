"""Benchmark: merge a rank-32 LoRA into a full-size SD1.5 fp16 checkpoint, loratool vs a naive in-memory merge.

    python benchmarks/bench_merge.py [--keep DIR]

Writes a synthetic full-size checkpoint (~2 GB) and LoRA under a temporary folder (deleted afterwards),
then runs each merge in its own subprocess and reports wall time, peak RSS (``ru_maxrss``, which also
counts the resident pages of memory-mapped input files) and peak anonymous RSS (``RssAnon`` sampled
every 5 ms: the memory the process itself allocated). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def _rss_anon_kib() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    return 0


def _child(kind: str, base: str, lora: str, out: str) -> None:
    peak = {"anon": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak["anon"] = max(peak["anon"], _rss_anon_kib())
            time.sleep(0.005)

    import torch  # noqa: F401  (import cost outside the timed region, for both)

    threading.Thread(target=sample, daemon=True).start()
    start = time.perf_counter()
    if kind == "loratool":
        from loratool.cli import main

        rc = main(["merge", base, f"{lora}:0.8", "-o", out, "--force"])
        assert rc == 0
    else:
        from safetensors.torch import load_file, save_file

        from loratool.adapters import apply_to_weight, load_adapter
        from loratool.source import open_file

        sd = load_file(base)
        adapter = load_adapter(open_file(lora))
        for m in adapter.modules.values():
            t = m.target
            w = sd[t.address]
            if t.rows is None:
                sd[t.address] = apply_to_weight(w, m, 0.8).to(w.dtype)
            else:
                a, b = t.rows
                w[a:b] = apply_to_weight(w[a:b], m, 0.8).to(w.dtype)
        save_file(sd, out)
    seconds = time.perf_counter() - start
    stop.set()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "maxrss_mib": maxrss / 1024, "anon_mib": peak["anon"] / 1024}))


def _measure(kind: str, base: Path, lora: Path, out: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", kind, str(base), str(lora), str(out)], capture_output=True, text=True, check=True
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs=4, metavar=("KIND", "BASE", "LORA", "OUT"))
    parser.add_argument("--keep", help="use/keep this folder instead of a temporary one")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each (ABBA order); the best wall time is reported")
    args = parser.parse_args()
    if args.child:
        _child(*args.child)
        return

    from loratool.synth import iter_lora, write_checkpoint
    from loratool.writer import save_tensors

    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-merge-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        base, lora = folder / "sd15-full.safetensors", folder / "lora-r32.safetensors"
        if not base.exists():
            t = time.perf_counter()
            write_checkpoint(base, "sd1", factor=1, seed=0, force=True)
            print(f"wrote {base.stat().st_size / 2**30:.2f} GiB checkpoint in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        if not lora.exists():
            save_tensors(lora, dict(iter_lora("sd1", rank=32, alpha=16.0, factor=1, seed=1)), force=True)
        runs: dict[str, list[dict]] = {"loratool": [], "naive": []}
        order = ["loratool", "naive", "naive", "loratool"] * ((args.repeat + 1) // 2)
        for kind in order[: 2 * args.repeat]:  # ABBA order, so slow phases of a busy machine hit both
            # warm the page cache the same way for both, then measure
            subprocess.run(["cat", str(base)], stdout=subprocess.DEVNULL, check=True)
            runs[kind].append(_measure(kind, base, lora, folder / f"out-{kind}.safetensors"))
            (folder / f"out-{kind}.safetensors").unlink()
        # best wall time (least disturbed by other load), worst memory
        results = {
            k: {"seconds": min(r["seconds"] for r in v), "maxrss_mib": max(r["maxrss_mib"] for r in v),
                "anon_mib": max(r["anon_mib"] for r in v), "all_seconds": [round(r["seconds"], 1) for r in v]}
            for k, v in runs.items()
        }  # fmt: skip
        lt, nv = results["loratool"], results["naive"]
        print(f"checkpoint {base.stat().st_size / 2**30:.2f} GiB, LoRA rank 32 ({lora.stat().st_size / 2**20:.0f} MiB), "
              f"{os.cpu_count()} CPUs")  # fmt: skip
        print(f"{'':10} {'wall s':>8} {'peak RSS MiB':>13} {'peak anon MiB':>14}   (best wall of {args.repeat}, worst memory)")
        for kind, r in results.items():
            print(f"{kind:10} {r['seconds']:8.1f} {r['maxrss_mib']:13.0f} {r['anon_mib']:14.0f}   runs: {r['all_seconds']}")
        print(f"{'ratio':10} {lt['seconds'] / nv['seconds']:8.2f} {lt['maxrss_mib'] / nv['maxrss_mib']:13.2f} "
              f"{lt['anon_mib'] / nv['anon_mib']:14.2f}   (loratool / naive)")  # fmt: skip
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
