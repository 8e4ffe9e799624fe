"""The streaming engine of merge and convert: read ahead, compute, write behind — overlapped.

A plan is a list of :class:`Item`: which writer gets which output key, made from which input key(s)
by which function. :func:`run` then runs three stages at once:

* a **reader** thread reads the inputs of the coming items (``pread``; the GIL is released while the
  kernel copies), up to a byte budget ahead of the computation;
* the **calling** thread computes each output tensor and casts it to its planned dtype (torch releases
  the GIL too);
* a **writer** thread writes finished tensors behind it, up to a byte budget (``pwrite``: bytes only).

A tensor passed through unchanged (no function, same dtype, safetensors in and out) is never read
into memory: the writer copies its bytes file to file with ``copy_file_range``. Memory is bounded by
the two budgets plus the largest tensor (one item may exceed a budget when nothing else is queued).

A source that can map its file (safetensors: ``mapped``/``prefetch``/``drop``) is not read into
buffers at all: the reader maps each input and faults its pages in ahead of the computation; after
the last item using it, an input is unmapped as soon as that item's result is computed into new
memory, or else (a result that is a view of it) once the result is written. That saves a copy and a
freshly faulted buffer per input byte (measured on an SD1.5 convert: 1.0 s of 3.8 s CPU in the kernel).

Any exception — a bad tensor, a full disk, SIGINT/SIGTERM in the calling thread — stops both threads
before it propagates, so the writers' ``__exit__`` can remove their temporary files safely.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..progress import Progress

if TYPE_CHECKING:
    import torch

#: Default bytes read ahead of the computation and queued behind it for writing (each).
DEFAULT_BUDGET = 128 << 20


@dataclass(frozen=True)
class Item:
    """One output tensor: ``writer.write(key, fn(*inputs))``; ``fn`` None passes ``inputs[0]`` through.

    ``fn`` must not keep its inputs, or views of them, once it returns (except in its result): a mapped
    input is unmapped once its last item is computed (or written, when the result is a view of it).
    """

    writer: Any
    key: str
    inputs: tuple[str, ...]
    fn: Callable[..., torch.Tensor] | None = None
    nbytes: int = 0  # size of the inputs, for the read-ahead budget


class _Stop(Exception):
    pass


class _Budgeted:
    """A FIFO queue bounded by the bytes of what it holds (an item larger than the bound waits for an empty queue)."""

    def __init__(self, budget: int):
        self.budget = budget
        self.held = 0
        self.items: deque = deque()
        self.cond = threading.Condition()
        self.stopped = False
        self.peak = 0

    def put(self, item, nbytes: int) -> None:
        with self.cond:
            while not self.stopped and self.items and self.held + nbytes > self.budget:
                self.cond.wait()
            if self.stopped:
                raise _Stop
            self.items.append((item, nbytes))
            self.held += nbytes
            self.peak = max(self.peak, self.held)
            self.cond.notify_all()

    def get(self):
        with self.cond:
            while not self.stopped and not self.items:
                self.cond.wait()
            if self.stopped and not self.items:
                raise _Stop
            item, nbytes = self.items.popleft()
            self.held -= nbytes
            self.cond.notify_all()
            return item

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.items.clear()
            self.held = 0
            self.cond.notify_all()


@dataclass
class StreamStats:
    """What a run did: tensors computed, tensors copied raw, the byte budget of each queue, the peak bytes
    each queue held, and the largest item (inputs or output; the one item allowed past a budget)."""

    computed: int = 0
    copied: int = 0
    budget: int = 0
    peak_read_ahead: int = 0
    peak_write_behind: int = 0
    largest_item: int = 0

    def add(self, other: StreamStats) -> StreamStats:
        """Two runs (one after the other) as one: counts added, budgets and peaks the larger."""
        return StreamStats(
            self.computed + other.computed, self.copied + other.copied, max(self.budget, other.budget),
            max(self.peak_read_ahead, other.peak_read_ahead), max(self.peak_write_behind, other.peak_write_behind),
            max(self.largest_item, other.largest_item),
        )

    def to_dict(self) -> dict[str, int]:
        """The ``stream`` object of the commands' ``--json`` reports (bytes; stable keys)."""
        return {
            "tensors_computed": self.computed,
            "tensors_copied": self.copied,
            "budget_bytes": self.budget,
            "peak_read_ahead_bytes": self.peak_read_ahead,
            "peak_write_behind_bytes": self.peak_write_behind,
            "largest_item_bytes": self.largest_item,
        }


def stream_json(stats: StreamStats | None) -> dict[str, int] | None:
    """The ``stream`` value of a report's ``--json``: :meth:`StreamStats.to_dict`, or None when nothing streamed."""
    return stats.to_dict() if stats is not None else None


def _shares_memory(out: torch.Tensor, inputs: Sequence[torch.Tensor]) -> bool:
    ptr = out.untyped_storage().data_ptr()
    return any(t.untyped_storage().data_ptr() == ptr for t in inputs)


def _raw_copyable(source, item: Item):
    if item.fn is not None or len(item.inputs) != 1 or not hasattr(item.writer, "copy_raw"):
        return None
    key = item.inputs[0]
    if source.spec(key).dtype != item.writer.specs[item.key].dtype:
        return None
    return source.raw_range(key)


def run(
    source,
    items: Sequence[Item],
    budget: int = DEFAULT_BUDGET,
    on_progress: Progress | None = None,
) -> StreamStats:
    """Stream every item from ``source`` through its function into its writer (see the module docstring).

    The writers must already be open; finalizing them is the caller's job. Raises whatever a stage raised.
    """
    stats = StreamStats(budget=budget)
    ahead, behind = _Budgeted(budget), _Budgeted(budget)
    errors: list[BaseException] = []
    raw = [_raw_copyable(source, it) for it in items]
    maps = all(hasattr(source, a) for a in ("mapped", "prefetch", "drop"))
    last_use: dict[str, int] = {}  # input key → the last item reading it (then its pages are unmapped)
    for i, (it, rng) in enumerate(zip(items, raw)):
        if rng is None:
            last_use.update((k, i) for k in it.inputs)
    largest = [0]  # the reader's largest item, in bytes
    dropped_after: dict[int, list[str]] = {}
    for k, i in last_use.items():
        dropped_after.setdefault(i, []).append(k)

    def read(key: str) -> torch.Tensor:
        t = source.mapped(key) if maps else None
        if t is None:
            return source.get(key)
        source.prefetch(key)
        return t

    def reader() -> None:
        last: tuple[str, Any] | None = None  # q, k, v slices of one fused tensor read it once
        try:
            for it, rng in zip(items, raw):
                if rng is not None:
                    ahead.put(None, 0)
                    continue
                tensors = []
                for key in it.inputs:
                    if last is None or last[0] != key:
                        last = (key, read(key))
                    tensors.append(last[1])
                nbytes = it.nbytes or sum(t.numel() * t.element_size() for t in tensors)
                largest[0] = max(largest[0], nbytes)
                ahead.put(tensors, nbytes)
        except _Stop:
            pass
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
            errors.append(exc)
            ahead.stop()

    def writer() -> None:
        try:
            while True:
                job = behind.get()
                if job is None:
                    return
                i, it, payload, rng = job
                if rng is not None:
                    it.writer.copy_raw(it.key, *rng, source.spec(it.inputs[0]).dtype)
                else:
                    it.writer.write(it.key, payload)
                    del payload, job
                    if maps:
                        for key in dropped_after.get(i, ()):
                            source.drop(key)
        except _Stop:
            pass
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
            errors.append(exc)
            behind.stop()
            ahead.stop()

    threads = [threading.Thread(target=reader, daemon=True), threading.Thread(target=writer, daemon=True)]
    for t in threads:
        t.start()
    ok = False
    try:
        for n, (it, rng) in enumerate(zip(items, raw), 1):
            tensors = ahead.get()
            if rng is not None:
                behind.put((n - 1, it, None, rng), 0)
                stats.copied += 1
            else:
                out = it.fn(*tensors) if it.fn is not None else tensors[0]
                if hasattr(it.writer, "cast"):  # casts here, so the writer thread only moves bytes
                    out = it.writer.cast(it.key, out)
                if maps and n - 1 in dropped_after and not _shares_memory(out, tensors):
                    for key in dropped_after.pop(n - 1):  # computed into new memory: unmapped now, not once written
                        source.drop(key)
                del tensors
                nbytes = out.numel() * out.element_size()
                stats.largest_item = max(stats.largest_item, nbytes)
                behind.put((n - 1, it, out, None), nbytes)
                del out
                stats.computed += 1
            if on_progress:
                on_progress(n, len(items), it.key)
        behind.put(None, 0)
        threads[1].join()
        ok = True
    except _Stop:  # a thread failed: its error is in `errors`
        pass
    finally:
        ahead.stop()
        if not ok:
            behind.stop()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    stats.peak_read_ahead, stats.peak_write_behind = ahead.peak, behind.peak
    stats.largest_item = max(stats.largest_item, largest[0])
    return stats
