"""Trigger words and tags from kohya training metadata (``ss_tag_frequency``, dataset folders)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass

from .fields import parse_json_field


@dataclass(frozen=True)
class TagShare:
    """One caption tag: how many images carry it, and that count's share of the images counted."""

    tag: str
    count: int
    share: float


@dataclass(frozen=True)
class DreamboothFolder:
    """A kohya / DreamBooth training folder named ``N_identifier class`` (``10_sks dog``)."""

    folder: str
    repeats: int
    identifier: str
    class_name: str


@dataclass(frozen=True)
class Triggers:
    """Everything a file says about the words that trigger it."""

    tags: tuple[TagShare, ...]
    images: int
    folders: tuple[DreamboothFolder, ...]
    trigger_phrase: str | None

    @property
    def words(self) -> tuple[str, ...]:
        """The likely trigger words, strongest evidence first: modelspec phrase, folder identifiers, top tag."""
        out: list[str] = []
        if self.trigger_phrase:
            out.append(self.trigger_phrase)
        out.extend(f.identifier for f in self.folders)
        if self.tags:
            out.append(self.tags[0].tag)
        seen: set[str] = set()
        return tuple(w for w in out if w and not (w in seen or seen.add(w)))


_FOLDER = re.compile(r"^(\d+)_(.+)$")


def dreambooth_folder(name: str) -> DreamboothFolder | None:
    """Parse a folder name ``N_identifier class``: N repeats, the first word is the trigger, the rest the class.

    Example:
        ``dreambooth_folder("10_sks dog")`` → repeats 10, identifier ``sks``, class ``dog``;
        ``dreambooth_folder("images")`` → None.
    """
    m = _FOLDER.match(name.strip().replace("\\", "/").rsplit("/", 1)[-1])
    if not m:
        return None
    words = m.group(2).strip().split(None, 1)
    if not words:
        return None
    return DreamboothFolder(name, int(m.group(1)), words[0], words[1] if len(words) > 1 else "")


def dataset_folders(metadata: Mapping[str, str]) -> dict[str, dict[str, int | None]]:
    """``folder → {"repeats", "images"}`` from ``ss_dataset_dirs`` and the subsets of ``ss_datasets``."""
    out: dict[str, dict[str, int | None]] = {}
    dirs = parse_json_field(metadata, "ss_dataset_dirs")
    if isinstance(dirs, dict):
        for name, info in dirs.items():
            info = info if isinstance(info, dict) else {}
            out[name] = {"repeats": _int_or_none(info.get("n_repeats")), "images": _int_or_none(info.get("img_count"))}
    for name, sub in _training_subsets(metadata):
        info = {"repeats": _int_or_none(sub.get("num_repeats")), "images": _int_or_none(sub.get("img_count"))}
        out.setdefault(name, info)
    return out


def _training_subsets(metadata: Mapping[str, str]) -> list[tuple[str, dict]]:
    """(folder basename, subset) for the non-regularisation subsets of ``ss_datasets``."""
    out = []
    datasets = parse_json_field(metadata, "ss_datasets")
    for ds in datasets if isinstance(datasets, list) else []:
        for sub in (ds.get("subsets") or []) if isinstance(ds, dict) else []:
            if not isinstance(sub, dict) or not sub.get("image_dir") or sub.get("is_reg"):
                continue
            out.append((str(sub["image_dir"]).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1], sub))
    return out


def _int_or_none(v) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def tag_frequency(metadata: Mapping[str, str]) -> dict[str, dict[str, int]]:
    """``folder → {tag: images carrying it}`` from ``ss_tag_frequency`` (or the ``tag_frequency`` of ``ss_datasets``)."""
    freq = parse_json_field(metadata, "ss_tag_frequency")
    if not isinstance(freq, dict):
        freq = {}
        datasets = parse_json_field(metadata, "ss_datasets")
        for ds in datasets if isinstance(datasets, list) else []:
            if isinstance(ds, dict) and isinstance(ds.get("tag_frequency"), dict):
                freq.update(ds["tag_frequency"])
    out: dict[str, dict[str, int]] = {}
    for folder, tags in freq.items():
        if isinstance(tags, dict):
            out[folder] = {str(t).strip(): int(c) for t, c in tags.items() if _int_or_none(c) is not None and str(t).strip()}
    return out


def rank_tags(
    freq: Mapping[str, Mapping[str, int]], images: Mapping[str, int | None] | None = None
) -> tuple[list[TagShare], int]:
    """Sum tag counts across folders and rank them by share of images.

    ``share(tag) = Σ_f count_f(tag) / Σ_f images_f``, where ``images_f`` is the folder's image count
    (``img_count`` of ``ss_dataset_dirs``) or, when that is unknown, the count of the folder's most
    frequent tag (every image of a folder usually carries the folder's trigger tag). Ties are broken
    by tag name, so the order is stable.

    Returns:
        (tags best first, total images counted).
    """
    images = images or {}
    total: dict[str, int] = {}
    n_images = 0
    for folder, tags in freq.items():
        known = images.get(folder)
        n_images += known if known else max(tags.values(), default=0)
        for tag, count in tags.items():
            total[tag] = total.get(tag, 0) + count
    ranked = sorted(total.items(), key=lambda kv: (-kv[1], kv[0]))
    return [TagShare(t, c, round(c / n_images, 4) if n_images else 0.0) for t, c in ranked], n_images


def trigger_words(metadata: Mapping[str, str]) -> Triggers:
    """Trigger evidence of a kohya / modelspec file: ranked caption tags, DreamBooth folders, ``modelspec.trigger_phrase``."""
    freq = tag_frequency(metadata)
    folders = dataset_folders(metadata)
    tags, n = rank_tags(freq, {k: v["images"] for k, v in folders.items()})
    names = sorted(set(freq) | set(folders))
    parsed = [f for f in (dreambooth_folder(n_) for n_ in names) if f is not None]
    # dataset-config DreamBooth subsets name their trigger in class_tokens ("sks dog"), whatever the folder is called
    named = {f.folder for f in parsed}
    for folder, sub in _training_subsets(metadata):
        tokens = str(sub.get("class_tokens") or "").split(None, 1)
        if tokens and folder not in named:
            repeats = _int_or_none(sub.get("num_repeats")) or 1
            parsed.append(DreamboothFolder(folder, repeats, tokens[0], tokens[1] if len(tokens) > 1 else ""))
            named.add(folder)
    phrase = (metadata.get("modelspec.trigger_phrase") or "").strip() or None
    return Triggers(tuple(tags), n, tuple(parsed), phrase)


