"""Where work runs: the one device resolver and the thread policy of every command.

Threads: torch's OpenMP pool pays off for large matrix products and SVDs, but a batch of small
factorizations (resize's QR + small SVD per module, the tiny trainer's ops) is dominated by thread
start-up and, when another process computes on the same cores, by OpenMP threads spinning against
each other (measured on the 2-core machine: resize r128→32 of an SD1.5 LoRA 3.5 s alone with either
setting, but 39.7 s with 2 threads against 9.0 s with 1 next to a busy torch process). Work that is
small per call therefore runs in :func:`threads` ``(1)``; large products keep torch's default. The CLI
also sets ``OMP_WAIT_POLICY=PASSIVE`` (unless the environment sets it) before torch loads, so idle
OpenMP threads sleep instead of spinning: next to a busy process, 2-thread matrix work was 30x slower
with spinning threads and within 20 % of one thread with sleeping ones (benchmarks/bench_threads.py).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from .errors import LoratoolError

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cpu", "cuda")

#: Work per call (output elements × inner dimension) below which one thread is as fast as many
#: (a 1280×1280 rank-32 update, 5e7, runs twice as fast on two threads).
SMALL_WORK = 1 << 22
#: The same for factorizations (QR, SVD): LAPACK panels gain from threads only on much larger matrices.
SMALL_FACTORIZATION = 1 << 28


def resolve_device(device: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` (or ``cuda:N``) without a GPU is an error."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LoratoolError("--device cuda: no CUDA device is available to torch", hint="use --device cpu or --device auto")
    if device != "cpu" and not device.startswith("cuda"):
        raise LoratoolError(f"unknown device {device!r}", hint="use auto, cpu or cuda")
    try:
        return torch.device(device)
    except RuntimeError:
        raise LoratoolError(f"unknown device {device!r}", hint="use auto, cpu or cuda") from None


@contextmanager
def threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch CPU threads (``None``: leave the setting alone), then restore it."""
    import torch

    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def threads_for(work: int, small: int = SMALL_WORK) -> int | None:
    """Threads for a call doing ``work`` multiply-adds: 1 below ``small``, else None (torch's pool).

    ``LORATOOL_THREADS=N`` fixes the count for every call; ``LORATOOL_THREADS=all`` always uses torch's
    default pool (the behaviour without a policy, kept for the benchmark).
    """
    override = _threads_override()
    if override == "all":
        return None
    if isinstance(override, int):
        return override
    return 1 if work < small else None


def _threads_override() -> int | str | None:
    """``LORATOOL_THREADS``: a positive count, ``"all"``, or None (unset or anything else)."""
    text = os.environ.get("LORATOOL_THREADS", "").strip().lower()
    if text.isdigit() and int(text) > 0:
        return int(text)
    return "all" if text == "all" else None


#: The most threads :func:`split_rows` uses: past this the disk, not the arithmetic, bounds a merge.
MAX_ROW_WORKERS = 4
_pool = None
_pool_lock = threading.Lock()


def row_workers() -> int:
    """Threads for work split by rows (:func:`split_rows`): torch's CPU thread count, at most
    :data:`MAX_ROW_WORKERS`; ``LORATOOL_THREADS=N`` sets it."""
    import torch

    override = _threads_override()
    n = override if isinstance(override, int) else torch.get_num_threads()
    return max(1, min(MAX_ROW_WORKERS, n))


def split_rows(rows: int, step: int, fn, workers: int | None = None) -> list:
    """``fn(r0, r1)`` over ``[0, rows)`` cut into at most ``workers`` runs of whole ``step``-row blocks,
    each on its own thread with one torch thread (the calling thread takes the first run); the results
    in row order. Each run is the same sequence of per-block operations a single thread would do, so
    the result does not depend on the number of workers. Exceptions propagate; every run has ended
    by then.

    For row-blocked work whose blocks are too small for torch's own pool (a merge's 1 MiB blocks):
    the threads work on different blocks instead of waiting on each other inside one.
    """
    global _pool
    workers = row_workers() if workers is None else max(1, workers)
    blocks = -(-rows // max(1, step))
    per = -(-blocks // min(workers, max(1, blocks)))
    runs = [(i * per * step, min(rows, (i + 1) * per * step)) for i in range(-(-blocks // per))] if blocks else []

    def one(r0: int, r1: int):
        with threads(1):
            return fn(r0, r1)

    if len(runs) <= 1:
        return [one(*r) for r in runs]
    with _pool_lock:
        if _pool is None:
            from concurrent.futures import ThreadPoolExecutor

            _pool = ThreadPoolExecutor(MAX_ROW_WORKERS - 1, thread_name_prefix="loratool-rows")
    from concurrent.futures import wait

    futures = [_pool.submit(one, *r) for r in runs[1:]]
    try:
        first = one(*runs[0])
    finally:
        wait(futures)  # every run has ended, even when ours failed
    return [first, *(f.result() for f in futures)]


#: glibc's ``mallopt`` parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_malloc_tuned = False


def reuse_freed_memory() -> bool:
    """Have glibc's malloc keep freed blocks for reuse instead of giving them back to the kernel (the CLI
    calls it once, before torch loads). Returns whether the setting was applied.

    By default glibc serves each block of 32 MiB or more (most weights of a checkpoint, and the outputs of a
    merge or cast) with a fresh ``mmap`` and unmaps it on free: every page of every output tensor is then
    faulted in and zeroed by the kernel anew. Served from the heap (``M_MMAP_MAX`` 0) and with the heap not
    trimmed below 1 GiB of free space (``M_TRIM_THRESHOLD``), the streaming engine's short-lived buffers
    reuse the same pages: measured on the 2-core machine (warm SD1.5 merge, medians of 5), system CPU
    2.26 → 1.73 s and wall 2.64 → 2.23 s; peak RSS +50 MiB. A process whose environment sets glibc's own
    ``MALLOC_MMAP_MAX_`` or ``MALLOC_TRIM_THRESHOLD_`` keeps its choice; other C libraries are left alone.
    """
    global _malloc_tuned
    if _malloc_tuned:
        return True
    if any(k in os.environ for k in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _malloc_tuned = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))
    return _malloc_tuned
