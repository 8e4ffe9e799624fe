"""Measurement helpers shared by the benchmark scripts: each measured step runs in its own process.

Reported per step: wall seconds, peak RSS (``VmHWM``: includes resident pages of memory-mapped
inputs, which the kernel can drop) and peak anonymous RSS (``RssAnon`` sampled every 5 ms: the
memory the process itself allocated — the number that bounds what a merge needs). ``VmHWM``, not
``ru_maxrss``: Linux carries ``ru_maxrss`` over ``fork`` + ``exec``, so a child started by a driver that
holds 1.4 GB reported 1.4 GB whatever it did (the SDXL rows of run.py's tables before 2026-12-03).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def rss_anon_kib() -> int:
    return _status_kib("RssAnon")


@contextmanager
def measured() -> Iterator[dict]:
    """Time the block and sample peak anonymous RSS; the yielded dict is filled on exit."""
    result: dict = {}
    peak = {"anon": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak["anon"] = max(peak["anon"], rss_anon_kib())
            time.sleep(0.005)

    threading.Thread(target=sample, daemon=True).start()
    start = time.perf_counter()
    try:
        yield result
    finally:
        result["seconds"] = time.perf_counter() - start
        stop.set()
        result["maxrss_mib"] = (_status_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024
        result["anon_mib"] = max(peak["anon"], rss_anon_kib()) / 1024


def loratool(*args: str, quiet: bool = False) -> str:
    """Run the loratool CLI in this process and return what it printed (``quiet``: not printed too); a non-zero
    exit raises SystemExit."""
    import contextlib
    import io

    from loratool.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(list(args))
    if not quiet:
        sys.stdout.write(out.getvalue())
    if rc:
        raise SystemExit(rc)
    return out.getvalue()


def child_main(steps: dict[str, Callable[..., object]], argv: list[str]) -> None:
    """Run ``steps[argv[0]](*argv[1:])`` measured, and print the measurement as the last stdout line."""
    import gc

    # As the loratool CLI does before torch loads (loratool.cli.main), for every step alike: torch
    # imported here first would otherwise fix spinning OpenMP waits, which burn a core on this machine.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch  # noqa: F401  (import cost outside the timed region, for every step alike)

    gc.freeze()  # as the loratool CLI does once torch is loaded (loratool.cli._FreezeAfterTorch), for every step alike

    with measured() as result:
        extra = steps[argv[0]](*argv[1:])
    if isinstance(extra, dict):
        result.update(extra)
    print(json.dumps(result))


def run_child(script: str, *args: str, python: str | None = None) -> dict:
    """Run ``python script --child args...`` (``python``: another interpreter) and return its measurement."""
    proc = subprocess.run([python or sys.executable, script, "--child", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{args[0]} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cold(path: str) -> None:
    """Drop a file's pages from the page cache (clean pages only: the inputs are never written)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm(path: str) -> None:
    """Read a file once so every measured step starts from the same (warm) page cache."""
    with open(path, "rb") as fh:
        while fh.read(1 << 24):
            pass


def _ordered(t):
    """IEEE bit patterns as integers in value order (adjacent floats differ by 1), for ulp distances."""
    import torch

    bits = {2: torch.int16, 4: torch.int32}[t.element_size()]
    x = t.contiguous().view(bits).long()
    sign = 1 << (8 * t.element_size() - 1)
    return torch.where(x < 0, -(x + sign), x)


def compare_checkpoints(a: Path, b: Path, same_keys: bool = True) -> dict:
    """Key by key: the largest ulp distance, the largest relative Frobenius error, and how many elements differ.

    ``same_keys``: two files with different key sets, or a tensor in two dtypes, are an error; else the keys
    both hold in the same dtype are compared and the others counted (``only_a``, ``only_b``, ``other_dtype``: a
    peer tool may drop or add keys, or store buffers such as ``alphas_cumprod`` in another dtype).
    """
    import torch

    from loratool.io.source import open_file

    worst_ulp, worst_rel, differing, total, keys, other_dtype = 0, 0.0, 0, 0, 0, 0
    with open_file(a) as sa, open_file(b) as sb:
        ka, kb = set(sa.keys()), set(sb.keys())
        if same_keys and ka != kb:
            return {"error": "the two files hold different keys"}
        for k in sorted(ka & kb):
            x, y = sa.get(k), sb.get(k)
            if x.dtype != y.dtype and x.shape == y.shape and not same_keys:
                other_dtype += 1
                continue
            if x.dtype != y.dtype or x.shape != y.shape:
                return {"error": f"{k}: {x.dtype}{tuple(x.shape)} against {y.dtype}{tuple(y.shape)}"}
            keys += 1
            total += x.numel()
            if torch.equal(x, y):  # most tensors: passed through unchanged, or computed to the same bits
                continue
            differing += int((x != y).sum())
            if not x.is_floating_point():
                continue
            if x.element_size() in (2, 4):
                worst_ulp = max(worst_ulp, int((_ordered(x) - _ordered(y)).abs().max()))
            xf, yf = x.float(), y.float()  # the difference of two close floats is exact in float32
            ref = float(torch.linalg.vector_norm(yf))
            err = float(torch.linalg.vector_norm(xf - yf))
            worst_rel = max(worst_rel, err / ref if ref else (0.0 if err == 0 else float("inf")))
    result = {"keys": keys, "elements": total, "differing": differing, "max_ulp": worst_ulp, "max_rel_fro": worst_rel}
    if not same_keys:
        result.update(only_a=len(ka - kb), only_b=len(kb - ka), other_dtype=other_dtype)
    return result
