"""Trigger words, readable training parameters and hashes, on hand-made inputs with hand-computed answers."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loratool.io.output import save_tensors
from loratool.metadata import (
    addnet_hash,
    autov2,
    dreambooth_folder,
    file_sha256,
    hash_report,
    legacy_hash,
    rank_tags,
    training_summary,
    trigger_words,
    with_hashes,
)

# FIPS 180-2 test vectors
SHA256_ABC = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
SHA256_EMPTY = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"

FREQ = {
    "10_sks dog": {"sks": 10, "dog": 8, "grass": 2},
    "5_sks": {"dog": 5, "sks": 5, "sky": 1},
}


def test_rank_tags_sums_folders_and_divides_by_images():
    # folder 1 has 10 images (img_count); folder 2 has none recorded → its top tag count (5) stands in: 15 images
    tags, n = rank_tags(FREQ, {"10_sks dog": 10})
    assert n == 15
    assert [(t.tag, t.count) for t in tags] == [("sks", 15), ("dog", 13), ("grass", 2), ("sky", 1)]
    assert tags[0].share == 1.0
    assert tags[1].share == pytest.approx(13 / 15, abs=1e-4)
    # with both image counts known, shares use them
    tags, n = rank_tags(FREQ, {"10_sks dog": 20, "5_sks": 20})
    assert n == 40 and tags[0].share == pytest.approx(15 / 40)


def test_rank_tags_ties_break_by_name():
    tags, _ = rank_tags({"a": {"b": 3, "a": 3, "c": 1}})
    assert [t.tag for t in tags] == ["a", "b", "c"]


def test_dreambooth_folder_names():
    f = dreambooth_folder("10_sks dog")
    assert (f.repeats, f.identifier, f.class_name) == (10, "sks", "dog")
    f = dreambooth_folder("3_ohwx man in suit")
    assert (f.repeats, f.identifier, f.class_name) == (3, "ohwx", "man in suit")
    assert dreambooth_folder("5_sks").class_name == ""
    assert dreambooth_folder("images") is None
    assert dreambooth_folder("10_") is None


def test_trigger_words_from_metadata():
    meta = {
        "ss_tag_frequency": json.dumps(FREQ),
        "ss_dataset_dirs": json.dumps(
            {"10_sks dog": {"n_repeats": 10, "img_count": 10}, "5_sks": {"n_repeats": 5, "img_count": 5}}
        ),
        "modelspec.trigger_phrase": "sks dog",
    }
    t = trigger_words(meta)
    assert t.images == 15
    assert [f.identifier for f in t.folders] == ["sks", "sks"]
    assert t.trigger_phrase == "sks dog"
    assert t.words == ("sks dog", "sks")
    assert trigger_words({}).words == ()
    # broken JSON is ignored, not fatal
    assert trigger_words({"ss_tag_frequency": "{oops"}).tags == ()


def test_training_summary_is_readable():
    meta = {
        "ss_learning_rate": "0.0001",
        "ss_resolution": "(512, 768)",
        "ss_network_args": json.dumps({"conv_dim": "4", "algo": "locon"}),
        "ss_network_dim": "16",
        "ss_training_started_at": "0",
        "ss_num_epochs": "None",
    }
    fields = {f.name: f.value for f in training_summary(meta)}
    assert fields == {
        "learning_rate": "0.0001",
        "resolution": "512×768",
        "network_args": "conv_dim=4, algo=locon",
        "network_dim": "16",
        "started_at": "1970-01-01 00:00 UTC",
    }


def test_hashes_on_hand_computed_cases(tmp_path):
    p = tmp_path / "abc.bin"
    p.write_bytes(b"abc")
    assert file_sha256(p) == SHA256_ABC
    assert autov2(SHA256_ABC) == "ba7816bf8f"
    assert legacy_hash(p) == SHA256_EMPTY[:8]  # nothing at offset 1 MiB
    # legacy hash: 64 KiB at 1 MiB
    big = tmp_path / "big.bin"
    block = bytes(range(256)) * 256
    big.write_bytes(b"\0" * 0x100000 + block + b"tail")
    assert legacy_hash(big) == hashlib.sha256(block).hexdigest()[:8]
    # addnet hash: the bytes after the 8-byte length and the header
    header = b'{"__metadata__":{"a":"b"}}'
    data = b"abc"
    st = tmp_path / "x.safetensors"
    st.write_bytes(struct.pack("<Q", len(header)) + header + data)
    assert addnet_hash(st) == SHA256_ABC


def test_stored_sshs_hashes_are_checked(tmp_path):
    tensors = {"lora_unet_x.lora_down.weight": torch.arange(8, dtype=torch.float16).reshape(2, 4)}
    meta = with_hashes(tensors, {"ss_network_dim": "2"})
    good = tmp_path / "good.safetensors"
    save_tensors(good, tensors, meta)
    r = hash_report(good, meta, load_tensors=lambda: tensors)
    assert r.model_match is True and r.legacy_match is True
    assert r.addnet == meta["sshs_model_hash"] and r.addnet_short == r.addnet[:12]
    stale = dict(meta, sshs_model_hash="0" * 64, sshs_legacy_hash="deadbeef")
    r = hash_report(good, stale, load_tensors=lambda: tensors)
    assert r.model_match is False and r.legacy_match is False
    r = hash_report(good, {}, load_tensors=None)
    assert r.model_match is None and r.legacy_match is None


@pytest.mark.parametrize("header_len", [0, 5, 31, 64])
@pytest.mark.parametrize("chunk", [1, 7, 32, 1 << 20])
def test_one_pass_hashes_equal_the_separate_ones(tmp_path, header_len, chunk):
    from loratool.metadata import file_and_data_sha256

    p = tmp_path / "f.safetensors"
    p.write_bytes(struct.pack("<Q", header_len) + b"h" * header_len + bytes(range(100)))
    assert file_and_data_sha256(p, True, chunk) == (file_sha256(p), addnet_hash(p))
    assert file_and_data_sha256(p, False, chunk) == (file_sha256(p), None)


def test_dataset_config_subsets_give_triggers_and_skip_regularisation():
    datasets = [
        {
            "subsets": [
                {"image_dir": "/data/train/char", "img_count": 8, "num_repeats": 4, "class_tokens": "ohwx woman"},
                {"image_dir": "/data/reg/1_woman", "img_count": 100, "num_repeats": 1, "class_tokens": "woman", "is_reg": True},
            ],
            "tag_frequency": {"char": {"ohwx": 8, "smile": 2}},
        }
    ]
    t = trigger_words({"ss_datasets": json.dumps(datasets)})
    assert [(f.folder, f.identifier, f.class_name, f.repeats) for f in t.folders] == [("char", "ohwx", "woman", 4)]
    assert t.images == 8  # the regularisation folder is not counted
    assert [(x.tag, x.share) for x in t.tags] == [("ohwx", 1.0), ("smile", 0.25)]


_tag = st.text(alphabet="abcdefghij_ ", min_size=1, max_size=6).filter(lambda t: t.strip() == t and t)
_freq = st.dictionaries(st.sampled_from(["1_a", "2_b c", "x"]), st.dictionaries(_tag, st.integers(1, 50), min_size=1), min_size=1)


@settings(max_examples=60, deadline=None)
@given(_freq)
def test_rank_tags_properties(freq):
    tags, n = rank_tags(freq)
    # counts are conserved, each tag once, ranked by share (then name)
    assert sum(t.count for t in tags) == sum(sum(d.values()) for d in freq.values())
    assert len({t.tag for t in tags}) == len(tags)
    assert [(-t.count, t.tag) for t in tags] == sorted((-t.count, t.tag) for t in tags)
    assert n == sum(max(d.values()) for d in freq.values())
    assert all(t.share == round(t.count / n, 4) for t in tags)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 999),
    st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True),
    st.from_regex(r"([a-z]{1,6}( [a-z]{1,6})?)?", fullmatch=True),
)
def test_dreambooth_folder_round_trip(repeats, identifier, cls):
    name = f"{repeats}_{identifier}" + (f" {cls}" if cls else "")
    f = dreambooth_folder(name)
    assert (f.repeats, f.identifier, f.class_name) == (repeats, identifier, cls)
