import os
import struct

import pytest
import torch

from loratool.errors import FormatError, OutputError, UnsafePickleError
from loratool.io.output import save_tensors
from loratool.io.source import TensorSpec, open_file
from loratool.io.writer import SafetensorsWriter

TENSORS = {
    "w.weight": torch.randn(3, 4, dtype=torch.float16),
    "b": torch.arange(5),
    "x.alpha": torch.tensor(2.0),
    "bf": torch.randn(2, 2, dtype=torch.bfloat16),
    "f8": torch.randn(4).to(torch.float8_e4m3fn),
}


def test_safetensors_round_trip_is_identity(tmp_path):
    p = save_tensors(tmp_path / "a.safetensors", TENSORS, {"ss_network_dim": "4"})
    src = open_file(p)
    assert set(src.keys()) == set(TENSORS)
    assert src.metadata == {"ss_network_dim": "4"}
    for k, v in TENSORS.items():
        assert src.spec(k).shape == tuple(v.shape)
        got = src.get(k)
        assert got.dtype == v.dtype
        assert torch.equal(got.reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8))


def test_safetensors_library_reads_our_output(tmp_path):
    from safetensors.torch import load_file

    p = save_tensors(tmp_path / "a.safetensors", TENSORS)
    loaded = load_file(p)
    assert torch.equal(loaded["w.weight"], TENSORS["w.weight"])


def test_writer_finalize_can_grow_metadata_past_reservation(tmp_path):
    specs = {"a": TensorSpec((2,), "F32")}
    with SafetensorsWriter(tmp_path / "o.safetensors", specs) as w:
        w.write("a", torch.ones(2))
        w.finalize({"big": "x" * 200_000})
    src = open_file(tmp_path / "o.safetensors")
    assert len(src.metadata["big"]) == 200_000
    assert torch.equal(src.get("a"), torch.ones(2))


def test_writer_output_is_deterministic(tmp_path):
    a = save_tensors(tmp_path / "a.safetensors", TENSORS, {"m": "1"})
    b = save_tensors(tmp_path / "b.safetensors", TENSORS, {"m": "1"})
    assert a.read_bytes() == b.read_bytes()


def test_writer_refuses_existing_output_and_input(tmp_path):
    p = save_tensors(tmp_path / "a.safetensors", TENSORS)
    before = p.read_bytes()
    with pytest.raises(OutputError, match="already exists"):
        save_tensors(p, TENSORS)
    with pytest.raises(OutputError, match="also an input"):
        save_tensors(p, TENSORS, inputs=[p], force=True)
    assert p.read_bytes() == before


def test_writer_leaves_nothing_behind_on_error(tmp_path):
    specs = {"a": TensorSpec((2,), "F32"), "b": TensorSpec((2,), "F32")}
    with pytest.raises(RuntimeError):
        with SafetensorsWriter(tmp_path / "o.safetensors", specs) as w:
            w.write("a", torch.ones(2))
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_truncated_and_corrupt_safetensors_fail_cleanly(tmp_path):
    p = save_tensors(tmp_path / "a.safetensors", TENSORS)
    data = p.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) - 10])
    with pytest.raises(FormatError):
        open_file(tmp_path / "trunc.safetensors")
    (tmp_path / "hdr.safetensors").write_bytes(struct.pack("<Q", 10) + b"{not json!" + data[18:])
    with pytest.raises(FormatError):
        open_file(tmp_path / "hdr.safetensors")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(FormatError, match="too short"):
        open_file(tmp_path / "empty.safetensors")
    (tmp_path / "huge.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(FormatError, match="claims"):
        open_file(tmp_path / "huge.safetensors")
    (tmp_path / "notes.txt").write_text("hello world, not a model")
    with pytest.raises(FormatError):
        open_file(tmp_path / "notes.txt")


def test_ckpt_is_read_lazily_and_state_dict_unwrapped(tmp_path):
    torch.save({"state_dict": TENSORS, "epoch": 7, "global_step": 100}, tmp_path / "m.ckpt")
    src = open_file(tmp_path / "m.ckpt")
    assert src.format == "pickle"
    assert set(src.keys()) == set(TENSORS)
    assert src.extras["epoch"] == 7
    for k, v in TENSORS.items():
        assert torch.equal(src.get(k).reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8))


def test_ckpt_views_share_storage(tmp_path):
    base = torch.arange(12, dtype=torch.float32)
    torch.save({"a": base[2:8].view(2, 3), "b": base.view(3, 4).t()}, tmp_path / "v.pt")
    src = open_file(tmp_path / "v.pt")
    assert torch.equal(src.get("a"), base[2:8].view(2, 3))
    assert torch.equal(src.get("b"), base.view(3, 4).t())


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/loratool-pwned",))


def test_malicious_pickle_is_refused_and_not_executed(tmp_path):
    marker = "/tmp/loratool-pwned"
    if os.path.exists(marker):
        os.unlink(marker)
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _Evil()}, tmp_path / "evil.ckpt")
    with pytest.raises(UnsafePickleError, match="system"):
        open_file(tmp_path / "evil.ckpt")
    assert not os.path.exists(marker)


def _mapped_resident_kib(path) -> int:
    """Resident KiB of every mapping of ``path`` in this process (from /proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as fh:
        for line in fh:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5:
                inside = line.rstrip().endswith(str(path))
            elif inside and line.startswith("Rss:"):
                total += int(head[1])
    return total


def test_safetensors_tensors_are_read_not_mapped(tmp_path):
    """Mapped pages count as resident until unmapped, so streaming a 7 GB file through a map shows 7 GB RSS.
    ``get`` reads per tensor and keeps the file's pages out of the process's resident set."""
    big = {f"w{i}": torch.randn(256, 1024) for i in range(8)}  # 8 MiB of data
    p = save_tensors(tmp_path / "m.safetensors", big)
    src = open_file(p)
    for k in src.keys():
        assert torch.equal(src.get(k), big[k])
    assert _mapped_resident_kib(p) < 1024


def test_mapped_tensors_equal_read_ones_and_writes_to_them_stay_private(tmp_path):
    """The streaming engine's view of a file (a private map): the same values as ``get`` at every
    unaligned offset, and a write into a mapped tensor changes neither the file nor a later read."""
    gen = torch.Generator().manual_seed(5)
    tensors = {f"t{i}": torch.randn(3 + 97 * i, generator=gen).to(torch.float16 if i % 2 else torch.float32)
               for i in range(12)}  # odd byte sizes: most tensors start and end inside a page
    p = save_tensors(tmp_path / "m.safetensors", tensors)
    before = p.read_bytes()
    src = open_file(p)
    for k, t in tensors.items():
        m = src.mapped(k)
        assert m.dtype == t.dtype and torch.equal(m, t)
        m.fill_(7)  # copy-on-write: private to this process
        assert torch.equal(src.get(k), t)
    assert p.read_bytes() == before
    src.close()


def test_dropped_mapped_pages_leave_the_resident_set_and_reread_from_the_file(tmp_path):
    big = {f"w{i}": torch.randn(256, 1024) for i in range(8)}  # 8 MiB of data
    p = save_tensors(tmp_path / "m.safetensors", big)
    src = open_file(p)
    views = {k: src.mapped(k) for k in src.keys()}
    for k in views:
        src.prefetch(k)
    assert _mapped_resident_kib(p) > 7 * 1024  # prefetched: the pages are mapped in
    for k in views:
        src.drop(k)
    assert _mapped_resident_kib(p) < 1024  # of 8 MiB: the pages two tensors share, and what the kernel maps around them
    for k, v in views.items():
        assert torch.equal(v, big[k])  # a dropped page reads the file again
    src.close()
