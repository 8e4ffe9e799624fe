"""File hashes and kohya / modelspec metadata helpers: pure functions on bytes, paths and dict[str, str]."""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

def now() -> float:
    """Unix time for every date loratool writes (``ss_training_*_at``, ``modelspec.date``);
    ``SOURCE_DATE_EPOCH`` (reproducible builds) fixes it, so reruns are byte-identical."""
    import time

    fixed = os.environ.get("SOURCE_DATE_EPOCH")
    return float(fixed) if fixed else time.time()


def iso_date(t: float | None = None) -> str:
    """``YYYY-MM-DDTHH:MM:SS`` (UTC) of ``t`` (default :func:`now`), the modelspec date format."""
    return datetime.fromtimestamp(now() if t is None else t, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")


_LEGACY_OFFSET = 0x100000
_LEGACY_LENGTH = 0x10000


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    """sha256 of the whole file (civitai "SHA256"; its first 10 hex digits are A1111's AutoV2)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def autov2(sha256_hex: str) -> str:
    """A1111's short model hash: the first 10 hex digits of the file sha256."""
    return sha256_hex[:10]


def addnet_hash(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    """sha256 of a safetensors file's tensor data (everything after the header).

    This is kohya's ``sshs_model_hash`` and the hash A1111 uses for LoRAs (its first 12 digits: "AutoV3").
    """
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        fh.seek(8 + n)
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def legacy_hash(path: str | os.PathLike) -> str:
    """Old A1111 / additional-networks hash: sha256 of 64 KiB at offset 1 MiB, first 8 hex digits."""
    with open(path, "rb") as fh:
        fh.seek(_LEGACY_OFFSET)
        return hashlib.sha256(fh.read(_LEGACY_LENGTH)).hexdigest()[:8]


def kohya_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """``(sshs_model_hash, sshs_legacy_hash)`` exactly as sd-scripts precomputes them before saving.

    kohya serialises the tensors with only the ``ss_*`` metadata and hashes that buffer; for the
    model hash only the tensor data counts, for the legacy hash 64 KiB at 1 MiB of the buffer.
    Meant for adapter-sized outputs (the buffer is built in memory).
    """
    from safetensors.torch import save

    ss = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    buf = save({k: v.contiguous() for k, v in tensors.items()}, ss)
    (n,) = struct.unpack("<Q", buf[:8])
    model = hashlib.sha256(buf[8 + n:]).hexdigest()
    legacy = hashlib.sha256(buf[_LEGACY_OFFSET:_LEGACY_OFFSET + _LEGACY_LENGTH]).hexdigest()[:8]
    return model, legacy


def with_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, str]:
    """``metadata`` plus fresh ``sshs_model_hash`` / ``sshs_legacy_hash`` (stale ones are replaced)."""
    out = {k: v for k, v in metadata.items() if k not in ("sshs_model_hash", "sshs_legacy_hash")}
    model, legacy = kohya_hashes(tensors, out)
    out["sshs_model_hash"] = model
    out["sshs_legacy_hash"] = legacy
    return out


def parse_json_field(metadata: Mapping[str, str], key: str):
    """Decode a JSON-valued metadata field (``ss_tag_frequency``, ``ss_dataset_dirs``...); None if absent or broken."""
    raw = metadata.get(key)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except (TypeError, ValueError):
        return None


# ----------------------------------------------------------------------------- trigger words


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


# ----------------------------------------------------------------------------- training parameters


def _num(v: str) -> str:
    try:
        return f"{float(v):g}"
    except ValueError:
        return v


def _resolution(v: str) -> str:
    nums = re.findall(r"\d+", v)
    return "×".join(nums) if nums else v


def _time(v: str) -> str:
    try:
        return datetime.fromtimestamp(float(v), tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    except (ValueError, OverflowError, OSError):
        return v


def _network_args(v: str) -> str:
    try:
        args = json.loads(v)
    except ValueError:
        return v
    if isinstance(args, dict):
        return ", ".join(f"{k}={val}" for k, val in args.items()) or "none"
    return v


def _dataset_dirs(v: str) -> str:
    try:
        dirs = json.loads(v)
    except ValueError:
        return v
    if not isinstance(dirs, dict):
        return v
    parts = []
    for name, info in dirs.items():
        info = info if isinstance(info, dict) else {}
        parts.append(f"{name} ({info.get('img_count', '?')} images × {info.get('n_repeats', '?')} repeats)")
    return "; ".join(parts)


# (metadata key, stable name, label, formatter) in display order
TRAINING_FIELDS: tuple[tuple[str, str, str, Callable[[str], str]], ...] = (
    ("ss_output_name", "output_name", "output name", str),
    ("ss_sd_model_name", "base_model", "base model", str),
    ("ss_base_model_version", "base_model_version", "base model version", str),
    ("ss_v2", "v2", "SD2 (v2)", str),
    ("ss_network_module", "network_module", "network module", str),
    ("ss_network_dim", "network_dim", "network dim", str),
    ("ss_network_alpha", "network_alpha", "network alpha", _num),
    ("ss_network_args", "network_args", "network args", _network_args),
    ("ss_learning_rate", "learning_rate", "learning rate", _num),
    ("ss_unet_lr", "unet_lr", "UNet lr", _num),
    ("ss_text_encoder_lr", "text_encoder_lr", "text encoder lr", _num),
    ("ss_optimizer", "optimizer", "optimizer", str),
    ("ss_lr_scheduler", "lr_scheduler", "lr scheduler", str),
    ("ss_lr_warmup_steps", "lr_warmup_steps", "lr warmup steps", str),
    ("ss_num_epochs", "epochs", "epochs", str),
    ("ss_epoch", "epoch", "epoch saved", str),
    ("ss_max_train_steps", "max_train_steps", "max train steps", str),
    ("ss_steps", "steps", "steps trained", str),
    ("ss_batch_size_per_device", "batch_size", "batch size", str),
    ("ss_gradient_accumulation_steps", "gradient_accumulation_steps", "gradient accumulation", str),
    ("ss_resolution", "resolution", "resolution", _resolution),
    ("ss_num_train_images", "train_images", "train images", str),
    ("ss_num_reg_images", "reg_images", "regularisation images", str),
    ("ss_dataset_dirs", "dataset_dirs", "dataset dirs", _dataset_dirs),
    ("ss_mixed_precision", "mixed_precision", "mixed precision", str),
    ("ss_clip_skip", "clip_skip", "clip skip", str),
    ("ss_noise_offset", "noise_offset", "noise offset", _num),
    ("ss_min_snr_gamma", "min_snr_gamma", "min SNR gamma", _num),
    ("ss_seed", "seed", "seed", str),
    ("ss_training_started_at", "started_at", "training started", _time),
    ("ss_training_finished_at", "finished_at", "training finished", _time),
    ("ss_training_comment", "comment", "comment", str),
)


@dataclass(frozen=True)
class TrainingField:
    name: str
    label: str
    value: str


def training_summary(metadata: Mapping[str, str]) -> tuple[TrainingField, ...]:
    """The kohya ``ss_*`` training parameters present in ``metadata``, in readable form, in a fixed order.

    Example: ``ss_resolution="(512, 512)"`` → ``TrainingField("resolution", "resolution", "512×512")``.
    """
    out = []
    for key, name, label, fmt in TRAINING_FIELDS:
        raw = metadata.get(key)
        if raw is None or raw in ("", "None"):
            continue
        out.append(TrainingField(name, label, fmt(raw)))
    return tuple(out)


# ----------------------------------------------------------------------------- hash report


def file_and_data_sha256(path: str | os.PathLike, is_safetensors: bool = True, chunk: int = 1 << 24) -> tuple[str, str | None]:
    """``(file_sha256(path), addnet_hash(path))`` in one read of the file (the addnet hash only for safetensors)."""
    from concurrent.futures import ThreadPoolExecutor

    whole = hashlib.sha256()
    data = hashlib.sha256() if is_safetensors else None
    # hashlib releases the GIL on large buffers: the two digests run on two cores.
    with open(path, "rb") as fh, ThreadPoolExecutor(max_workers=1) as pool:
        skip = 0
        if data is not None:
            head = fh.read(8)
            whole.update(head)
            (n,) = struct.unpack("<Q", head) if len(head) == 8 else (0,)
            skip = n
        while block := fh.read(chunk):
            pending = None
            if data is not None:
                if skip >= len(block):
                    skip -= len(block)
                else:
                    pending = pool.submit(data.update, memoryview(block)[skip:])
                    skip = 0
            whole.update(block)
            if pending is not None:
                pending.result()
    return whole.hexdigest(), data.hexdigest() if data is not None else None


@dataclass(frozen=True)
class HashReport:
    """File hashes as civitai / A1111 / kohya show them, and whether the stored ``sshs_*`` agree.

    ``model_match`` / ``legacy_match`` are None when the file stores no such hash (or it was not checked).
    """

    sha256: str
    autov2: str
    addnet: str | None
    addnet_short: str | None
    legacy: str
    stored_model: str | None
    stored_legacy: str | None
    model_match: bool | None
    legacy_match: bool | None


def hash_report(
    path: str | os.PathLike,
    metadata: Mapping[str, str],
    is_safetensors: bool = True,
    load_tensors: Callable[[], Mapping[str, torch.Tensor]] | None = None,
) -> HashReport:
    """Compute every hash of ``path`` and compare with the stored kohya ``sshs_*`` values.

    The stored model hash is checked against the sha256 of the tensor data (the addnet hash).
    The stored legacy hash is over kohya's in-memory buffer (header with only ``ss_*`` metadata), so it
    is recomputed with :func:`kohya_hashes` from ``load_tensors()`` when given, else left unchecked.
    """
    sha, addnet = file_and_data_sha256(path, is_safetensors)
    stored_model = metadata.get("sshs_model_hash")
    stored_legacy = metadata.get("sshs_legacy_hash")
    model_match = legacy_match = None
    if stored_model is not None and addnet is not None:
        model_match = stored_model.lower() == addnet
    if stored_legacy is not None and load_tensors is not None:
        re_model, re_legacy = kohya_hashes(load_tensors(), metadata)
        legacy_match = stored_legacy.lower() == re_legacy
        if stored_model is not None and not model_match:
            model_match = stored_model.lower() == re_model
    return HashReport(
        sha256=sha,
        autov2=autov2(sha),
        addnet=addnet,
        addnet_short=addnet[:12] if addnet else None,
        legacy=legacy_hash(path),
        stored_model=stored_model,
        stored_legacy=stored_legacy,
        model_match=model_match,
        legacy_match=legacy_match,
    )
