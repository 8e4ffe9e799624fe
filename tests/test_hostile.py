"""Hostile and broken inputs: each one ends in a LoratoolError (CLI: one line, exit 2), nothing executed."""

import io
import json
import os
import pickle
import struct
import zipfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loratool.adapters import index_adapter, split_key
from loratool.arch import ARCHES, SD_ARCHES
from loratool.arch.sd_naming import all_modules
from loratool.errors import FormatError, LoratoolError, UnsafePickleError
from loratool.io.source import open_file

MARKER = "/tmp/loratool-hostile-marker"


class _Reduce:
    """Pickles as a call of ``fn(*args)``: what a malicious checkpoint does."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


def _torch_zip(path, payload: bytes, extra: dict[str, bytes] | None = None):
    """A zip-format torch file whose data.pkl is ``payload`` (any pickle protocol)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/version", "3\n")
        for name, data in (extra or {}).items():
            z.writestr(name, data)
    return path


PAYLOADS = {
    "os.system": _Reduce(os.system, (f"touch {MARKER}",)),
    "eval": _Reduce(eval, (f"open({MARKER!r}, 'w')",)),
    "exec": _Reduce(exec, (f"open({MARKER!r}, 'w')",)),
    "getattr": _Reduce(getattr, (_Reduce(__import__, ("os",)), "system")),
    "nested": {"state_dict": {"w": [1, {"deep": _Reduce(os.system, (f"touch {MARKER}",))}]}},
}


@pytest.fixture(autouse=True)
def _no_marker():
    if os.path.exists(MARKER):
        os.unlink(MARKER)
    yield
    assert not os.path.exists(MARKER), "a pickle payload was executed"


@pytest.mark.parametrize("protocol", range(0, 6))
@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_malicious_pickle_refused_every_protocol(tmp_path, name, protocol):
    path = _torch_zip(tmp_path / "evil.ckpt", pickle.dumps(PAYLOADS[name], protocol=protocol))
    with pytest.raises(UnsafePickleError, match="allow-list"):
        open_file(path)


def test_raw_legacy_pickle_is_refused_unread(tmp_path):
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps(PAYLOADS["os.system"]))
    with pytest.raises(FormatError, match="zip-format"):
        open_file(path)


def test_zip_with_extra_records_still_reads(tmp_path):
    buf = io.BytesIO()
    torch.save({"w": torch.arange(4.0)}, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as z:
        records = {n: z.read(n) for n in z.namelist()}
    path = tmp_path / "x.ckpt"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        for n, d in records.items():
            z.writestr(n, d)
        z.writestr("archive/extra/notes.txt", "hello")
    src = open_file(path)
    assert torch.equal(src.get("w"), torch.arange(4.0))


def test_zip_missing_storage_record_fails_cleanly(tmp_path):
    buf = io.BytesIO()
    torch.save({"w": torch.arange(4.0)}, buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as z:
        records = {n: z.read(n) for n in z.namelist() if "/data/" not in n}
    path = tmp_path / "x.ckpt"
    with zipfile.ZipFile(path, "w") as z:
        for n, d in records.items():
            z.writestr(n, d)
    with pytest.raises(FormatError, match="missing"):
        open_file(path)


def _safetensors(path, header: dict | bytes, data: bytes):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


T = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
BROKEN = {
    "header beyond file": (struct.pack("<Q", 1 << 50), b""),
    "overlapping offsets": ({"a": T, "b": {**T, "data_offsets": [4, 12]}}, b"\0" * 12),
    "offsets out of range": ({"a": T, "b": {**T, "data_offsets": [8, 16]}}, b"\0" * 12),
    "wrong dtype size": ({"a": {**T, "shape": [3]}}, b"\0" * 8),
    "unknown dtype": ({"a": {**T, "dtype": "Q7"}}, b"\0" * 8),
    "non-utf8 metadata": (b'{"__metadata__":{"x":"\xff"},"a":' + json.dumps(T).encode() + b"}", b"\0" * 8),
    "non-string metadata": ({"__metadata__": {"x": 1}, "a": T}, b"\0" * 8),
    "duplicate keys": (b'{"a":' + json.dumps(T).encode() + b',"a":' + json.dumps({**T, "data_offsets": [8, 16]}).encode() + b"}",
                       b"\0" * 16),
    "not json": (b"{{{{", b""),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_safetensors_is_a_format_error(tmp_path, case):
    header, data = BROKEN[case]
    if case == "header beyond file":
        (tmp_path / "x.safetensors").write_bytes(header)
        path = tmp_path / "x.safetensors"
    else:
        path = _safetensors(tmp_path / "x.safetensors", header, data)
    with pytest.raises(FormatError):
        open_file(path)


def test_huge_metadata_is_a_format_error(tmp_path):
    header = {"__metadata__": {"x": "y" * (101 * 1024 * 1024)}, "a": T}
    path = _safetensors(tmp_path / "x.safetensors", header, b"\0" * 8)
    with pytest.raises(FormatError):
        open_file(path)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=256))
def test_fuzz_header_parser_never_crashes(tmp_path, blob):
    path = tmp_path / "f.safetensors"
    path.write_bytes(blob)
    try:
        src = open_file(path)
    except LoratoolError:
        return
    for k in src.keys():
        src.get(k)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=12), st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "F16", "I64", "U8", "Q7"]),
    "shape": st.lists(st.integers(0, 4), max_size=3),
    "data_offsets": st.tuples(st.integers(0, 64), st.integers(0, 64)),
}), max_size=4), st.integers(0, 64))
def test_fuzz_structured_headers(header, ndata):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = _safetensors(__import__("pathlib").Path(d) / "f.safetensors", header, b"\0" * ndata)
        try:
            src = open_file(path)
        except LoratoolError:
            return
        for k in src.keys():
            assert src.get(k).numel() == src.spec(k).numel


KEY_PARTS = st.sampled_from(
    ["lora_unet", "lora_te", "lora_te1", "unet", "text_encoder", "down_blocks", "0", "1", "attn1", "to_q",
     "lora_down", "lora_up", "weight", "alpha", "lora_A", "lora", "hada_w1_a", "lokr_w1", ".", "_", "diff"]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(KEY_PARTS, min_size=1, max_size=8).map("".join), max_size=10))
def test_fuzz_key_mapper_accounts_for_every_key(keys):
    keys = list(dict.fromkeys(keys))
    for arch in ARCHES:
        try:
            idx = index_adapter(keys, arch)
        except LoratoolError:
            continue
        mapped = [k for roles in idx.modules.values() for k in roles.values()]
        assert sorted(mapped + idx.unmapped) == sorted(keys)


@pytest.mark.parametrize("arch", SD_ARCHES)  # FLUX's module names: tests/test_flux.py
def test_key_mapper_round_trips_every_module(arch):
    for target in all_modules(arch).values():
        for key, role in ((f"{target.name}.lora_down.weight", "down"), (f"{target.peft_module}.lora_B.weight", "up")):
            module, got_role, _ = split_key(key)
            assert got_role == role
            idx = index_adapter([key], arch)
            assert idx.unmapped == [] and list(idx.targets.values()) == [target]
