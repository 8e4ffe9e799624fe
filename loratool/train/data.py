"""Training data the way kohya's scripts read it: DreamBooth folders, captions, aspect-ratio buckets, tokenizers.

Folder method: ``DATA/N_identifier class/`` holds images repeated ``N`` times per epoch; an image's
caption is ``image.txt`` or ``image.caption`` beside it, or else the folder's ``identifier class``.
Regularisation images (``--reg-data``) use the same layout and enter the loss with
``prior_loss_weight``.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from ..assets import byte_alphabet
from ..errors import FormatError, LoratoolError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_EXTENSIONS = (".txt", ".caption")
CLIP_VOCAB_SIZE = 49408
_FOLDER = re.compile(r"^(\d+)_(.+)$")


@dataclass(frozen=True)
class Item:
    """One training image: its caption, how often it repeats per epoch, and whether it is a regularisation image."""

    path: Path
    caption: str
    repeats: int
    is_reg: bool
    folder: str


@dataclass(frozen=True)
class Subset:
    """One ``N_identifier class`` folder."""

    path: Path
    repeats: int
    class_tokens: str
    items: tuple[Item, ...]
    is_reg: bool


def read_caption(image: Path, default: str) -> str:
    """The text of ``image.txt`` / ``image.caption`` (first found, whitespace-trimmed), else ``default``."""
    for ext in CAPTION_EXTENSIONS:
        p = image.with_suffix(ext)
        if p.is_file():
            text = p.read_text(encoding="utf-8").strip()
            if text:
                return text
    return default


def read_subsets(root: str | Path, is_reg: bool = False) -> list[Subset]:
    """Every ``N_identifier class`` folder under ``root`` (sorted by name), with its images and captions.

    Raises:
        LoratoolError: ``root`` is missing or holds no ``N_name`` folder with images.
    """
    root = Path(root)
    if not root.is_dir():
        raise LoratoolError(f"{root}: not a folder", hint="--data takes a folder of N_identifier class/ subfolders")
    folders = [root] if _FOLDER.match(root.name) else sorted(p for p in root.iterdir() if p.is_dir())
    subsets = []
    for folder in folders:
        m = _FOLDER.match(folder.name)
        if not m:
            continue
        repeats, tokens = int(m.group(1)), m.group(2).strip()
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        items = tuple(Item(p, read_caption(p, tokens), repeats, is_reg, folder.name) for p in images)
        if items:
            subsets.append(Subset(folder, repeats, tokens, items, is_reg))
    if not subsets:
        raise LoratoolError(
            f"{root}: no N_identifier class/ folder with images",
            hint="put images in e.g. DATA/10_sks dog/ (10 repeats, caption 'sks dog' unless a .txt caption is beside the image)",
        )
    return subsets


def tag_frequency(subsets: list[Subset]) -> dict[str, dict[str, int]]:
    """kohya's ``ss_tag_frequency``: per folder, how many images carry each comma-separated tag (repeats not counted)."""
    out: dict[str, dict[str, int]] = {}
    for s in subsets:
        c: Counter[str] = Counter()
        for item in s.items:
            for tag in item.caption.split(","):
                tag = tag.strip()
                if tag:
                    c[tag] += 1
        out[s.path.name] = dict(sorted(c.items()))
    return out


def dataset_dirs(subsets: list[Subset]) -> dict[str, dict[str, int]]:
    """kohya's ``ss_dataset_dirs``: ``{folder: {"n_repeats": N, "img_count": images}}``."""
    return {s.path.name: {"n_repeats": s.repeats, "img_count": len(s.items)} for s in subsets}


def expand(subsets: list[Subset]) -> list[Item]:
    """Each image ``repeats`` times: one epoch's worth of samples."""
    return [item for s in subsets for item in s.items for _ in range(item.repeats)]


# ----------------------------------------------------------------------------- buckets


def make_buckets(
    resolution: int, step: int = 64, min_side: int | None = None, max_side: int | None = None
) -> list[tuple[int, int]]:
    """Bucket sizes ``(width, height)`` with sides multiples of ``step`` and area ≤ ``resolution²``.

    For each width ``w`` from ``min_side`` to ``max_side`` the tallest height that fits the area is
    taken (``h = ⌊R²/w/step⌋·step``, capped at ``max_side``), and its transpose is added too.
    Defaults: ``min_side = max(step, R/2)``, ``max_side = 2R``.
    """
    lo = min_side or max(step, resolution // 2 // step * step)
    hi = max_side or resolution * 2
    area = resolution * resolution
    out: set[tuple[int, int]] = set()
    for w in range(lo, hi + 1, step):
        h = min(hi, area // w // step * step)
        if h >= lo:
            out.add((w, h))
            out.add((h, w))
    return sorted(out)


def choose_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's (``|log(w/h) − log(bw/bh)|``); larger area wins ties."""
    w, h = size
    ar = math.log(w / h)
    return min(buckets, key=lambda b: (round(abs(ar - math.log(b[0] / b[1])), 9), -b[0] * b[1]))


def load_image(path: Path, bucket: tuple[int, int]) -> torch.Tensor:
    """Image resized to cover ``bucket`` (keeping its aspect), centre-cropped, as (3,H,W) in [−1, 1]."""
    import numpy as np
    from PIL import Image

    try:
        img = Image.open(path).convert("RGB")
    except OSError as exc:
        raise FormatError(f"{path}: cannot read image ({exc})", hint="use PNG/JPEG/WebP images") from exc
    bw, bh = bucket
    scale = max(bw / img.width, bh / img.height)
    nw, nh = max(bw, round(img.width * scale)), max(bh, round(img.height * scale))
    img = img.resize((nw, nh), Image.Resampling.LANCZOS)
    left, top = (nw - bw) // 2, (nh - bh) // 2
    img = img.crop((left, top, left + bw, top + bh))
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32).copy())
    return arr.permute(2, 0, 1) / 127.5 - 1.0


def image_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.size
    except OSError as exc:
        raise FormatError(f"{path}: cannot read image ({exc})", hint="use PNG/JPEG/WebP images") from exc


# ----------------------------------------------------------------------------- tokenizers


class HashTokenizer:
    """Word-level tokenizer for models without a real vocabulary (the tiny base).

    Lower-cased words (``[a-z0-9]+``) and single punctuation marks map to
    ``crc32(word) mod (vocab − 2)``; ``vocab − 2`` is start-of-text, ``vocab − 1`` end-of-text,
    which also pads, as in CLIP. Different words may share an id (hash collisions).
    """

    def __init__(self, vocab_size: int, max_length: int = 77):
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.bos, self.eos = vocab_size - 2, vocab_size - 1

    def tokens(self, text: str) -> list[int]:
        words = re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())
        return [zlib.crc32(w.encode("utf-8")) % (self.vocab_size - 2) for w in words]

    def __call__(self, text: str) -> list[int]:
        return _frame(self.tokens(text), self.bos, self.eos, self.max_length)


def _frame(ids: list[int], bos: int, eos: int, max_length: int) -> list[int]:
    ids = [bos, *ids[: max_length - 2], eos]
    return ids + [eos] * (max_length - len(ids))


_CLIP_SPLIT = re.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+|_+", re.IGNORECASE)


class CLIPTokenizer:
    """CLIP's byte-level BPE from a ``vocab.json`` + ``merges.txt`` folder (as shipped with SD1's tokenizer).

    Text is whitespace-normalised and lower-cased, split into words, letters and digits; each
    word's UTF-8 bytes become characters (:func:`byte_alphabet`), the last one marked ``</w>``; then
    the adjacent pair with the lowest merge rank is merged until none is in the table. Ids are
    framed by ``<|startoftext|>`` / ``<|endoftext|>`` and padded with ``<|endoftext|>`` to 77.
    """

    def __init__(self, folder: str | Path | None = None, max_length: int = 77):
        if folder is None:  # the CLIP vocabulary shipped with loratool
            from ..assets import clip_merges, clip_vocab

            self.vocab = dict(clip_vocab())
            pairs: list[tuple[str, ...]] = list(clip_merges())
        else:
            folder = Path(folder)
            vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
            for p in (vocab_path, merges_path):
                if not p.is_file():
                    raise LoratoolError(f"{p}: not found",
                                        hint="--tokenizer takes a folder with CLIP's vocab.json and merges.txt")
            self.vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
            lines = merges_path.read_text(encoding="utf-8").splitlines()
            pairs = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        self.ranks = {p: i for i, p in enumerate(pairs) if len(p) == 2}
        self.max_length = max_length
        try:
            self.bos, self.eos = self.vocab["<|startoftext|>"], self.vocab["<|endoftext|>"]
        except KeyError as exc:
            raise LoratoolError(f"{folder}: no {exc.args[0]} token", hint="is this CLIP's vocab.json?") from None

    def bpe(self, word: str) -> list[str]:
        """Merge the characters of one pre-split word by merge rank; returns the final symbols."""
        alphabet = byte_alphabet()
        symbols = [alphabet[b] for b in word.encode("utf-8")]
        symbols[-1] = symbols[-1] + "</w>"
        while len(symbols) > 1:
            ranked = [(self.ranks.get((a, b), math.inf), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:], strict=False))]
            rank, _ = min(ranked)
            if rank == math.inf:
                break
            pair = next(p for r, p in ranked if r == rank)
            first, second = symbols[pair], symbols[pair + 1]
            merged: list[str] = []
            i = 0
            while i < len(symbols):
                if i < len(symbols) - 1 and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def tokens(self, text: str) -> list[int]:
        text = " ".join(text.split()).lower()
        ids = []
        for word in _CLIP_SPLIT.findall(text):
            if word in ("<|startoftext|>", "<|endoftext|>"):
                ids.append(self.vocab[word])
                continue
            for sym in self.bpe(word):
                if sym not in self.vocab:
                    raise LoratoolError(f"token {sym!r} is not in the vocabulary", hint="vocab.json and merges.txt do not match")
                ids.append(self.vocab[sym])
        return ids

    def __call__(self, text: str) -> list[int]:
        return _frame(self.tokens(text), self.bos, self.eos, self.max_length)


def make_tokenizer(vocab_size: int, folder: str | Path | None = None, max_length: int = 77) -> HashTokenizer | CLIPTokenizer:
    """CLIP BPE from ``folder``; without one, the bundled CLIP BPE for a text encoder with CLIP's real
    vocabulary (49408 ids), else word hashing (:class:`HashTokenizer`, for the tiny base).

    Raises:
        LoratoolError: ``folder``'s vocabulary has more ids than the text encoder.
    """
    if folder is None:
        if vocab_size == CLIP_VOCAB_SIZE:
            return CLIPTokenizer(None, max_length)
        return HashTokenizer(vocab_size, max_length)
    tok = CLIPTokenizer(folder, max_length)
    if max(tok.vocab.values()) >= vocab_size:
        raise LoratoolError(
            f"{folder}: vocabulary has {max(tok.vocab.values()) + 1} ids, the text encoder only {vocab_size}",
            hint="use the tokenizer that belongs to this checkpoint, or drop --tokenizer for word hashing",
        )
    return tok
