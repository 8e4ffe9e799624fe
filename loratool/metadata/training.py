"""Readable training parameters from kohya ``ss_*`` metadata (for inspect)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass


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


