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
    override = os.environ.get("LORATOOL_THREADS", "").strip().lower()
    if override == "all":
        return None
    if override.isdigit() and int(override) > 0:
        return int(override)
    return 1 if work < small else None
