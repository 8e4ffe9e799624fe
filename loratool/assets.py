"""Files shipped inside the package (``loratool/assets/``), so ``pip install loratool`` alone runs
every command, ``demo`` included:

* ``tiny-sd1.safetensors`` — the tiny SD1 base of ``train``/``sample``/``demo`` (every SD1 key, a
  genuine small config; rebuilt by ``fixtures/make_tiny_dataset.py``);
* ``tiny_dataset/`` — the demo's DreamBooth folders (four captioned images, two regularisation images);
* ``clip-merges.txt.gz`` — the 48,894 byte-level BPE merges of OpenAI CLIP's tokenizer (MIT licence),
  from which CLIP's 49,408-token ``vocab.json`` follows (:func:`clip_vocab`). Used by the trainer's real
  tokenizer and written into every diffusers pipeline folder we create (``tokenizer/``, ``tokenizer_2/``).
"""

from __future__ import annotations

import gzip
import json
from functools import cache
from importlib import resources
from pathlib import Path

from .errors import LoratoolError

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"


def asset(name: str) -> Path:
    """Path of a shipped file or folder (raises when the installation lacks it)."""
    p = Path(str(resources.files("loratool").joinpath("assets", name)))
    if not p.exists():
        raise LoratoolError(f"{p}: bundled file missing from this installation", hint="reinstall loratool")
    return p


def tiny_base() -> Path:
    return asset("tiny-sd1.safetensors")


def tiny_dataset() -> Path:
    return asset("tiny_dataset")


@cache
def byte_alphabet() -> dict[int, str]:
    """Byte → printable character for byte-level BPE: printable Latin-1 bytes map to themselves,
    the others (control chars, space…) to code points 256, 257, … in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@cache
def clip_merges() -> tuple[tuple[str, str], ...]:
    """CLIP's BPE merges in rank order."""
    text = gzip.decompress(asset("clip-merges.txt.gz").read_bytes()).decode("utf-8")
    return tuple(tuple(line.split(" ")) for line in text.splitlines()[1:] if line)  # type: ignore[misc]


@cache
def clip_vocab() -> dict[str, int]:
    """CLIP's token → id table, built as CLIP builds it: the 256 byte symbols, the same with the
    end-of-word mark ``</w>``, one token per merge in rank order, then ``<|startoftext|>`` (49406) and
    ``<|endoftext|>`` (49407)."""
    symbols = list(byte_alphabet().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in clip_merges()] + [CLIP_BOS, CLIP_EOS]
    return {t: i for i, t in enumerate(tokens)}


def write_clip_tokenizer(folder: Path, pad_token: str = CLIP_EOS, max_length: int = 77, vocab_size: int = 49408) -> list[str]:
    """A transformers ``CLIPTokenizer`` folder (``vocab.json``, ``merges.txt``, configs) with no network.

    ``pad_token`` is ``<|endoftext|>`` for CLIP-L (SD1, SDXL's first encoder) and ``!`` for the
    OpenCLIP encoders (SD2, SDXL's second), as the released pipelines ship them. A text encoder with a
    smaller vocabulary than CLIP's 49,408 (a small test model) gets CLIP's first ``vocab_size − 2``
    tokens and the merges that make them, with ``<|startoftext|>`` / ``<|endoftext|>`` as its last two ids,
    so every id the tokenizer emits exists in the embedding.
    """
    full = clip_vocab()
    keep = max(0, vocab_size - 2)
    tokens = [t for t, i in sorted(full.items(), key=lambda ti: ti[1]) if i < keep and t not in (CLIP_BOS, CLIP_EOS)]
    vocab = {t: i for i, t in enumerate([*tokens, CLIP_BOS, CLIP_EOS])}
    merges = [m for m in clip_merges() if "".join(m) in vocab]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    special = {"bos_token": CLIP_BOS, "eos_token": CLIP_EOS, "unk_token": CLIP_EOS, "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2, sort_keys=True) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "do_lower_case": True,
        "errors": "replace",
        "clean_up_tokenization_spaces": True,
        "add_prefix_space": False,
        **special,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return ["vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"]
