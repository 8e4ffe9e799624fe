"""Training data: DreamBooth folders (repeats, captions, tags), buckets, word-hash and CLIP BPE tokenizers."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from loratool.errors import LoratoolError
from loratool.train.data import (
    CLIPTokenizer,
    HashTokenizer,
    byte_alphabet,
    choose_bucket,
    dataset_dirs,
    expand,
    make_buckets,
    make_tokenizer,
    read_subsets,
    tag_frequency,
)


def _img(path: Path, size=(8, 8)) -> None:
    Image.new("RGB", size, (10, 20, 30)).save(path)


def test_repeats_and_captions(tmp_path):
    a = tmp_path / "3_ohwx cat"
    b = tmp_path / "1_style"
    a.mkdir()
    b.mkdir()
    (tmp_path / "notes").mkdir()  # no N_ prefix: ignored
    _img(a / "x.png")
    (a / "x.txt").write_text("ohwx cat, sitting\n")
    _img(a / "y.jpg")
    (a / "y.caption").write_text("ohwx cat, lying")
    _img(a / "z.png")  # no caption: folder name
    (a / "readme.md").write_text("not an image")
    _img(b / "w.webp")
    subsets = read_subsets(tmp_path)
    assert [(s.path.name, s.repeats, s.class_tokens, len(s.items)) for s in subsets] == [
        ("1_style", 1, "style", 1), ("3_ohwx cat", 3, "ohwx cat", 3)]
    captions = {i.path.name: i.caption for i in subsets[1].items}
    assert captions == {"x.png": "ohwx cat, sitting", "y.jpg": "ohwx cat, lying", "z.png": "ohwx cat"}
    items = expand(subsets)
    assert len(items) == 1 * 1 + 3 * 3
    assert sum(1 for i in items if i.path.name == "x.png") == 3
    assert tag_frequency(subsets) == {"1_style": {"style": 1},
                                      "3_ohwx cat": {"ohwx cat": 3, "sitting": 1, "lying": 1}}
    assert dataset_dirs(subsets) == {"1_style": {"n_repeats": 1, "img_count": 1}, "3_ohwx cat": {"n_repeats": 3, "img_count": 3}}
    json.dumps(tag_frequency(subsets))
    assert all(i.is_reg for i in expand(read_subsets(tmp_path, is_reg=True)))


def test_empty_data_folder_is_an_error(tmp_path):
    with pytest.raises(LoratoolError, match="N_identifier"):
        read_subsets(tmp_path)
    with pytest.raises(LoratoolError, match="not a folder"):
        read_subsets(tmp_path / "missing")


def test_buckets_512():
    buckets = make_buckets(512)
    assert (512, 512) in buckets and (256, 1024) in buckets and (1024, 256) in buckets
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in buckets)
    assert choose_bucket((1000, 1000), buckets) == (512, 512)
    assert choose_bucket((1920, 1080), buckets) == (640, 384)  # 1.78 → 1.67 is the nearest ratio
    assert choose_bucket((600, 1800), buckets) == (256, 832)  # 1/3 → 0.31 beats 0.42


@settings(max_examples=50, deadline=None)
@given(st.integers(16, 4000), st.integers(16, 4000), st.sampled_from([128, 256, 512, 768]))
def test_chosen_bucket_has_nearest_aspect(w, h, res):
    buckets = make_buckets(res)
    best = choose_bucket((w, h), buckets)
    d = abs(math.log(w / h) - math.log(best[0] / best[1]))
    assert all(d <= abs(math.log(w / h) - math.log(bw / bh)) + 1e-9 for bw, bh in buckets)


def test_hash_tokenizer_frames_and_is_stable():
    tok = HashTokenizer(1544)
    ids = tok("sks Blob, red")
    assert len(ids) == 77 and ids[0] == 1542 and ids[5] == 1543 and set(ids[5:]) == {1543}
    assert ids[1:5] == tok("SKS blob , RED")[1:5]
    assert ids[1] == HashTokenizer(1544)("sks")[1] and all(0 <= i < 1542 for i in ids[1:5])
    assert len(tok(" ".join(["word"] * 200))) == 77


def test_real_clip_vocab_uses_the_bundled_clip_bpe():
    tok = make_tokenizer(49408)
    assert isinstance(tok, CLIPTokenizer) and len(tok.vocab) == 49408
    # ids of OpenAI CLIP's tokenizer, as every SD1 prompt log shows them
    assert tok("a photo of a cat")[:7] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.vocab["<|startoftext|>"] == 49406 and tok.vocab["<|endoftext|>"] == 49407


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed")
def test_bundled_clip_tokenizer_folder_loads_in_transformers(tmp_path):
    from transformers import CLIPTokenizer as Reference

    from loratool.assets import write_clip_tokenizer

    write_clip_tokenizer(tmp_path)
    ref = Reference.from_pretrained(str(tmp_path), local_files_only=True)
    ours = make_tokenizer(49408)
    for text in ["a photo of a cat", "masterpiece, best quality, 1girl, <lora:x:0.8>", "naïve café 日本 x__y 3.14"]:
        assert ours(text) == ref(text, padding="max_length", max_length=77)["input_ids"], text


def _write_vocab(folder: Path, symbols: list[str], merges: list[str]) -> dict[str, int]:
    alphabet = sorted(set(byte_alphabet().values()))
    vocab_list = alphabet + [s + "</w>" for s in alphabet] + symbols + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {s: i for i, s in enumerate(dict.fromkeys(vocab_list))}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab


def test_clip_bpe_on_hand_made_vocab(tmp_path):
    merges = ["l o", "lo w</w>", "e r</w>", "n e", "ne w", "new er</w>"]
    vocab = _write_vocab(tmp_path, ["lo", "low</w>", "er</w>", "ne", "new", "newer</w>"], merges)
    tok = CLIPTokenizer(tmp_path)
    assert tok.bpe("low") == ["low</w>"]
    assert tok.bpe("lower") == ["lo", "w", "er</w>"]  # "w e" has no merge; "e r</w>" does
    assert tok.bpe("newer") == ["newer</w>"]
    assert tok.bpe("wen") == ["w", "e", "n</w>"]
    ids = tok("Low  NEWER, 7")
    body = [vocab["low</w>"], vocab["newer</w>"], vocab[",</w>"], vocab["7</w>"]]
    assert ids[:6] == [vocab["<|startoftext|>"], *body, vocab["<|endoftext|>"]]
    assert len(ids) == 77 and set(ids[6:]) == {vocab["<|endoftext|>"]}
    space = byte_alphabet()[ord(" ")]
    assert space == "Ġ" and byte_alphabet()[ord("a")] == "a"
    with pytest.raises(LoratoolError, match="text encoder only"):
        make_tokenizer(10, tmp_path)
    assert isinstance(make_tokenizer(100000, tmp_path), CLIPTokenizer)


def test_clip_tokenizer_needs_both_files(tmp_path):
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(LoratoolError, match="merges.txt"):
        CLIPTokenizer(tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed")
def test_clip_bpe_agrees_with_transformers(tmp_path):
    from transformers import CLIPTokenizer as Reference

    _write_vocab(tmp_path, ["lo", "low</w>", "er</w>", "ne", "new", "newer</w>"],
                 ["l o", "lo w</w>", "e r</w>", "n e", "ne w", "new er</w>"])
    ref = Reference(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    ours = CLIPTokenizer(tmp_path)
    for text in ["Low  NEWER, 7", "lower newer!! it's 42 élan café_x", "a  \t b", "hello-world 3.14 ok?", "naïve 日本 x__y"]:
        assert ours(text) == ref(text, padding="max_length", max_length=77)["input_ids"], text
