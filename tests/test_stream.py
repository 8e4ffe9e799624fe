"""The pipelined streaming engine: same bytes as a plain loop, raw copies, bounded queues, errors stop everything."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from loratool.io import stream
from loratool.io.output import save_tensors
from loratool.io.source import TensorSpec, open_file
from loratool.io.writer import SafetensorsWriter

FIX = Path(__file__).resolve().parent.parent / "fixtures"


def _source(tmp_path: Path, n: int = 40) -> Path:
    gen = torch.Generator().manual_seed(0)
    tensors = {f"t{i:02d}": torch.randn(64, 32 + i, generator=gen).to(torch.float16 if i % 2 else torch.float32)
               for i in range(n)}
    tensors["ids"] = torch.arange(10)
    return save_tensors(tmp_path / "src.safetensors", tensors)


def _plain_loop(src, out: Path, dtype_of, fn_of) -> bytes:
    specs = {k: TensorSpec(src.spec(k).shape, dtype_of(k)) for k in src.keys()}
    with SafetensorsWriter(out, specs) as w:
        for k in src.keys():
            t = src.get(k)
            fn = fn_of(k)
            w.write(k, fn(t) if fn else t)
        w.finalize()
    return out.read_bytes()


@pytest.mark.parametrize("budget", [1, 4096, stream.DEFAULT_BUDGET])
def test_engine_writes_what_a_plain_loop_writes(tmp_path, budget):
    src = open_file(_source(tmp_path))
    dtype_of = lambda k: "BF16" if k in ("t03", "t04") else src.spec(k).dtype  # noqa: E731 - two casts, the rest raw
    fn_of = lambda k: (lambda t: t * 2) if k.endswith("7") else None  # noqa: E731
    expected = _plain_loop(src, tmp_path / "plain.safetensors", dtype_of, fn_of)
    specs = {k: TensorSpec(src.spec(k).shape, dtype_of(k)) for k in src.keys()}
    calls = []
    with SafetensorsWriter(tmp_path / "piped.safetensors", specs) as w:
        stats = stream.run(src, [stream.Item(w, k, (k,), fn_of(k)) for k in src.keys()], budget=budget,
                           on_progress=lambda d, n, k: calls.append(d))
        w.finalize()
    assert (tmp_path / "piped.safetensors").read_bytes() == expected
    assert calls == list(range(1, len(src.keys()) + 1))
    assert stats.copied == len(src.keys()) - 2 - 4 and stats.computed == 6  # raw copies never read the tensor
    largest = max(s.nbytes for s in specs.values())
    assert stats.peak_read_ahead <= max(budget, largest) and stats.peak_write_behind <= max(budget, largest)


def test_raw_copy_falls_back_without_copy_file_range(tmp_path, monkeypatch):
    src = open_file(_source(tmp_path))
    expected = _plain_loop(src, tmp_path / "plain.safetensors", lambda k: src.spec(k).dtype, lambda k: None)

    def unsupported(*a, **k):
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", unsupported)
    specs = src.specs()
    with SafetensorsWriter(tmp_path / "piped.safetensors", specs) as w:
        assert stream.run(src, [stream.Item(w, k, (k,)) for k in specs]).copied == len(specs)
        w.finalize()
    assert (tmp_path / "piped.safetensors").read_bytes() == expected


@pytest.mark.parametrize("where", ["read", "compute", "write"])
def test_a_failure_in_any_stage_stops_the_run_and_leaves_no_file(tmp_path, monkeypatch, where):
    src = open_file(_source(tmp_path))
    specs = {k: TensorSpec(s.shape, "F32") for k, s in src.specs().items() if k != "ids"}
    real_get, real_prefetch, real_write = src.get, src.prefetch, SafetensorsWriter.write

    def get(key):
        if where == "read" and key == "t20":
            raise ValueError("bad read")
        return real_get(key)

    def prefetch(key):  # where a mapped input is read
        if where == "read" and key == "t20":
            raise ValueError("bad read")
        return real_prefetch(key)

    def write(self, key, t):
        if where == "write" and key == "t20":
            raise ValueError("bad write")
        return real_write(self, key, t)

    def fn(t):
        if where == "compute" and t.shape[1] == 52:
            raise ValueError("bad compute")
        return t

    monkeypatch.setattr(src, "get", get)
    monkeypatch.setattr(src, "prefetch", prefetch)
    monkeypatch.setattr(SafetensorsWriter, "write", write)
    out = tmp_path / "out.safetensors"
    with pytest.raises(ValueError, match=f"bad {where}"):
        with SafetensorsWriter(out, specs) as w:
            stream.run(src, [stream.Item(w, k, (k,), fn) for k in specs])
            w.finalize()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.safetensors"]


def test_merge_copies_untouched_tensors_byte_for_byte(tmp_path):
    from loratool.cli import main

    out = tmp_path / "m.safetensors"
    assert main(["merge", str(FIX / "sd15-tiny.safetensors"), str(FIX / "sd15-lora-kohya.safetensors"), "-o", str(out)]) == 0
    base, merged = open_file(FIX / "sd15-tiny.safetensors"), open_file(out)
    lora_targets = {k for k in base.keys() if not torch.equal(base.get(k), merged.get(k))}
    assert len(lora_targets) == 350  # the kohya table's 350 weights changed; every other tensor is identical
    for k in base.keys():
        if k not in lora_targets:
            fd, off, n = base.raw_range(k)
            mfd, moff, mn = merged.raw_range(k)
            assert os.pread(fd, n, off) == os.pread(mfd, mn, moff), k


@pytest.mark.parametrize("workers", ["1", "2", "3"])
def test_blocked_lora_merge_equals_the_formula_across_blocks(monkeypatch, workers):
    import loratool.ops.merge as merge
    from loratool.adapters import AdapterModule
    from loratool.arch import ModuleTarget

    monkeypatch.setattr(merge, "_BLOCK_BYTES", 64 * 4 * 3)  # 3 rows per block: every slice edge falls inside a block
    monkeypatch.setenv("LORATOOL_THREADS", workers)  # rows split over 1-3 threads: runs of 4, 5 or 10 blocks
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(30, 64, generator=gen).half()

    class Writer:
        specs = {"w": TensorSpec((30, 64), "F16")}
        clamped: dict = {}

    mods, assignments, expected = [], [], base.float().clone()
    for i, (rows, ratio) in enumerate((((0, 10), 0.7), ((10, 20), -0.4), ((20, 30), 1.2), (None, 0.25))):
        n = 10 if rows else 30
        down, up = torch.randn(4, 64, generator=gen), torch.randn(n, 4, generator=gen)
        t = ModuleTarget(f"m{i}", "linear", "w", rows, (30, 64), "unet/w")
        mods.append(AdapterModule(t, "lora", {"down": down, "up": up, "alpha": torch.tensor(2.0)}))
        assignments.append(merge.Assignment("w", rows, 0, f"m{i}", "lora", ratio))
        lo, hi = rows or (0, 30)
        expected[lo:hi] += ratio * (2.0 / 4) * (up @ down)  # W + ratio·(alpha/rank)·up·down, written out
    got = merge._merge_blocked(base, assignments, mods, Writer(), "w")
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), expected.half().float(), atol=2e-3, rtol=1e-3)  # one fp16 rounding


def test_split_rows_covers_every_row_once_whatever_the_workers():
    from loratool.runtime import split_rows

    for rows, step, workers in ((30, 3, 1), (30, 3, 2), (30, 3, 4), (31, 3, 3), (5, 10, 2), (0, 4, 2), (7, 1, 4)):
        runs = split_rows(rows, step, lambda a, b: (a, b), workers)
        assert runs[0][0] == 0 if rows else runs == []
        assert all(a % step == 0 and a < b for a, b in runs) and len(runs) <= workers
        assert [r for a, b in runs for r in range(a, b)] == list(range(rows))


def test_split_rows_raises_after_every_run_ended():
    import threading
    import time

    from loratool.runtime import split_rows

    ended = []

    def fn(a, b):
        if a == 0:
            raise ValueError("first run failed")
        time.sleep(0.2)
        ended.append((a, threading.current_thread().name))
        return a

    with pytest.raises(ValueError, match="first run failed"):
        split_rows(40, 10, fn, 4)
    assert sorted(a for a, _ in ended) == [10, 20, 30]  # the other runs finished before the error propagated


@pytest.mark.parametrize("result", ["new", "view"])
def test_a_run_leaves_none_of_a_mapped_input_resident(tmp_path, monkeypatch, result):
    """The reader maps inputs; after the last item using one (a fused input here, read by three items),
    it is unmapped as soon as that item is computed into new memory, or, when the result is a view of
    it, once the result is written. Streaming a file ends with none of it in the resident set."""
    from test_source_writer import _mapped_resident_kib

    gen = torch.Generator().manual_seed(1)
    tensors = {f"w{i}": torch.randn(512, 1024, generator=gen) for i in range(8)}  # 16 MiB
    p = save_tensors(tmp_path / "in.safetensors", tensors)
    src = open_file(p)
    dtype = "F16" if result == "new" else "F32"  # a view in its own dtype is written as it is
    specs = {f"{k}.{part}": TensorSpec((512 // 3 + (part == 0) * 2, 1024), dtype) for k in tensors for part in range(3)}
    cuts = {0: (0, 172), 1: (172, 342), 2: (342, 512)}
    seen, events = [], []

    def slice_of(key, part):
        def fn(t):
            seen.append(_mapped_resident_kib(p))
            events.append(("compute", f"{key}.{part}"))
            a, b = cuts[part]
            return t[a:b] * 2 if result == "new" else t[a:b]
        return fn

    real_drop, real_write = src.drop, SafetensorsWriter.write
    monkeypatch.setattr(src, "drop", lambda key: (events.append(("drop", key)), real_drop(key)))
    monkeypatch.setattr(SafetensorsWriter, "write",
                        lambda self, key, t: (events.append(("write", key)), real_write(self, key, t)))
    out = tmp_path / "out.safetensors"
    with SafetensorsWriter(out, specs) as w:
        stream.run(src, [stream.Item(w, f"{k}.{part}", (k,), slice_of(k, part)) for k in tensors for part in range(3)],
                   budget=1)
        w.finalize()
    assert max(seen) > 1024  # the inputs were mapped in while computed
    for k in tensors:  # each input unmapped once, after its third slice (computed / written), before any later use
        assert events.count(("drop", k)) == 1
        dropped = events.index(("drop", k))
        after = ("compute" if result == "new" else "write", f"{k}.2")
        assert events.index(after) < dropped
        if result == "view":
            assert dropped == events.index(after) + 1
        assert not [e for e in events[dropped:] if e[0] == "compute" and e[1].startswith(f"{k}.")]
    assert _mapped_resident_kib(p) < 1024  # of 16 MiB
    got = open_file(out)
    for k, t in tensors.items():
        for part, (a, b) in cuts.items():
            expected = t[a:b] * 2 if result == "new" else t[a:b]
            assert torch.equal(got.get(f"{k}.{part}"), expected.to(got.get(f"{k}.{part}").dtype))


@pytest.mark.parametrize("job", ["merge", "convert bf16", "convert diffusers"])
def test_reports_give_the_engines_budget_and_what_it_held(tmp_path, capsys, job):
    import json

    from loratool.cli import main

    base = FIX / "sd15-tiny.safetensors"
    out = tmp_path / ("out" if job == "convert diffusers" else "out.safetensors")
    argv = {
        "merge": ["merge", str(base), str(FIX / "sd15-lora-kohya.safetensors"), "-o", str(out)],
        "convert bf16": ["convert", str(base), str(out), "--dtype", "bf16"],
        "convert diffusers": ["convert", str(base), str(out), "--to", "diffusers"],
    }[job]
    capsys.readouterr()
    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["stream"]
    assert sorted(report) == ["budget_bytes", "largest_item_bytes", "peak_read_ahead_bytes", "peak_write_behind_bytes",
                              "tensors_computed", "tensors_copied"]
    assert report["budget_bytes"] == stream.DEFAULT_BUDGET
    src = open_file(base)
    if job == "convert diffusers":  # every written tensor went through the engine, one way or the other
        written = sum(len(open_file(f).keys()) for f in out.rglob("*.safetensors"))
        assert report["tensors_computed"] + report["tensors_copied"] == written
        assert 0 < report["tensors_computed"] < written  # conv1x1 → linear reshapes computed, the rest copied raw
    else:  # computed: the tensors whose bytes or dtype changed (read off the two files); copied: all the others
        dst = open_file(out)
        changed = [k for k in src.keys() if dst.spec(k).dtype != src.spec(k).dtype or not torch.equal(src.get(k), dst.get(k))]
        assert report["tensors_computed"] == len(changed) and report["tensors_copied"] == len(src.keys()) - len(changed)
        assert report["largest_item_bytes"] == max(max(src.spec(k).nbytes, dst.spec(k).nbytes) for k in changed)
    bound = max(report["budget_bytes"], report["largest_item_bytes"])
    assert 0 < report["peak_read_ahead_bytes"] <= bound and 0 < report["peak_write_behind_bytes"] <= bound


def test_a_dry_run_streams_nothing(capsys):
    import json

    from loratool.cli import main

    assert main(["merge", str(FIX / "sd15-tiny.safetensors"), str(FIX / "sd15-lora-kohya.safetensors"), "--dry-run",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stream"] is None
