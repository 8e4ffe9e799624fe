"""kohya ``ss_*`` and modelspec metadata: the one arch ↔ version table, dates, and the record builders
every writer of an adapter file uses (resize, extract, merge, convert, train).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone

NETWORK_MODULE = "networks.lora"  # what a plain LoRA file says it is (kohya's network module)

# arch → (ss_base_model_version, modelspec.architecture, modelspec.implementation, resolution) as sd-scripts writes them
_ARCH_RECORD = {
    "sd1": ("sd_v1", "stable-diffusion-v1", "diffusers", "512x512"),
    "sd2": ("sd_v2", "stable-diffusion-v2-512", "https://github.com/Stability-AI/generative-models", "512x512"),
    "sdxl": ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base", "https://github.com/Stability-AI/generative-models", "1024x1024"),
    "flux1": ("flux1", "flux-1-dev", "https://github.com/black-forest-labs/flux", "1024x1024"),
}
# prefixes by which ss_base_model_version / modelspec.architecture name an arch when reading
_READ = (
    ("flux1", "flux", "flux-1"),
    ("sdxl", "sdxl", "stable-diffusion-xl"),
    ("sd2", "sd_v2", "stable-diffusion-v2"),
    ("sd1", "sd_v1", "stable-diffusion-v1"),
)


def now() -> float:
    """Unix time for every date loratool writes (``ss_training_*_at``, ``modelspec.date``);
    ``SOURCE_DATE_EPOCH`` (reproducible builds) fixes it, so reruns are byte-identical."""
    import time

    fixed = os.environ.get("SOURCE_DATE_EPOCH")
    return float(fixed) if fixed else time.time()


def iso_date(t: float | None = None) -> str:
    """``YYYY-MM-DDTHH:MM:SS`` (UTC) of ``t`` (default :func:`now`), the modelspec date format."""
    return datetime.fromtimestamp(now() if t is None else t, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")


def arch_from_metadata(metadata: Mapping[str, str]) -> str | None:
    """The base architecture a training tool recorded (kohya ``ss_base_model_version`` / ``ss_v2``, modelspec)."""
    version = (metadata.get("ss_base_model_version") or "").lower()
    arch_field = (metadata.get("modelspec.architecture") or "").lower()
    for arch, v, spec in _READ:
        if version.startswith(v) or arch_field.startswith(spec):
            return arch
    v2 = (metadata.get("ss_v2") or "").lower()
    if v2 == "true":
        return "sd2"
    if v2 == "false" and metadata.get("ss_sd_model_name") is not None:
        return "sd1"
    return None


def base_model_fields(arch: str) -> dict[str, str]:
    """``ss_base_model_version`` and ``ss_v2`` for ``arch``."""
    return {"ss_base_model_version": _ARCH_RECORD[arch][0], "ss_v2": str(arch == "sd2")}


def dim_text(values: Iterable[float]) -> str:
    """kohya's convention for ``ss_network_dim`` / ``_alpha``: the common value as text, ``Dynamic`` when modules differ."""
    values = set(values)
    if len(values) == 1:
        v = values.pop()
        return str(int(v)) if float(v) == int(v) else str(v)
    return "Dynamic"


def network_fields(dim: str, alpha: str) -> dict[str, str]:
    """The network record of a plain LoRA: module, dim and alpha."""
    return {"ss_network_module": NETWORK_MODULE, "ss_network_dim": dim, "ss_network_alpha": alpha}


def conv_network_args(conv_dim: str, conv_alpha: str, existing: str | None = None) -> str:
    """``ss_network_args`` with kohya's ``conv_dim`` / ``conv_alpha`` set (other recorded arguments kept)."""
    try:
        args = json.loads(existing or "null")
    except ValueError:
        args = None
    args = args if isinstance(args, dict) else {}
    args["conv_dim"], args["conv_alpha"] = conv_dim, conv_alpha
    return json.dumps(args)


def modelspec_fields(arch: str, title: str, kind: str = "lora") -> dict[str, str]:
    """The Stability AI model-spec record (``modelspec.*``) sd-scripts writes, dated by :func:`now`."""
    _, spec, implementation, resolution = _ARCH_RECORD[arch]
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{spec}/{kind}",
        "modelspec.implementation": implementation,
        "modelspec.title": title,
        "modelspec.date": iso_date(),
        "modelspec.resolution": resolution,
    }
