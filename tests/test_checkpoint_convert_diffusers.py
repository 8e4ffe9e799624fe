"""Agreement with diffusers' own single-file converters (skipped when diffusers is not installed).

diffusers' ``convert_ldm_unet_checkpoint`` / ``convert_ldm_vae_checkpoint`` / ``convert_ldm_clip_checkpoint`` /
``convert_open_clip_checkpoint`` are plain state-dict functions; run on the tiny fixtures they must give the
same keys, shapes and values as our diffusers folder (the text-encoder ones need no transformers model).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from loratool.io.source import open_file
from loratool.ops.layout import convert_checkpoint

sfu = pytest.importorskip("diffusers.loaders.single_file_utils")

CASES = [("sd15", "sd1"), ("sd21", "sd2"), ("sdxl", "sdxl")]


def _reference(arch: str, ckpt: dict[str, torch.Tensor], folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    unet_cfg = {"class_embed_type": None, "num_class_embeds": None, "addition_embed_type": None,
                **json.loads((folder / "unet" / "config.json").read_text())}
    vae_cfg = json.loads((folder / "vae" / "config.json").read_text())
    ref = {"unet": sfu.convert_ldm_unet_checkpoint(ckpt, unet_cfg), "vae": sfu.convert_ldm_vae_checkpoint(ckpt, vae_cfg)}
    stub = SimpleNamespace(config=SimpleNamespace())
    if arch == "sd1":
        ref["text_encoder"] = sfu.convert_ldm_clip_checkpoint(ckpt)
    elif arch == "sd2":
        ref["text_encoder"] = sfu.convert_open_clip_checkpoint(stub, ckpt, prefix="cond_stage_model.model.")
    else:
        ref["text_encoder"] = sfu.convert_ldm_clip_checkpoint(ckpt, remove_prefix="conditioner.embedders.0.transformer.")
        ref["text_encoder_2"] = sfu.convert_open_clip_checkpoint(stub, ckpt, prefix="conditioner.embedders.1.model.")
    # diffusers' CLIP converters pass position_ids through; transformers ignores it on load
    for comp in ("text_encoder", "text_encoder_2"):
        if comp in ref:
            ref[comp] = {k: v for k, v in ref[comp].items() if not k.endswith("position_ids")}
    return ref


@pytest.mark.parametrize("name,arch", CASES)
def test_folder_equals_diffusers_converters(tmp_path, fixtures, name, arch):
    convert_checkpoint(fixtures / f"{name}-tiny.safetensors", tmp_path / name, "diffusers")
    src = open_file(fixtures / f"{name}-tiny.safetensors")
    ckpt = {k: src.get(k) for k in src.keys()}
    ours = open_file(tmp_path / name)
    ref = _reference(arch, ckpt, tmp_path / name)
    assert set(ref) == {k.split("/", 1)[0] for k in ours.keys()}
    for comp, tensors in ref.items():
        mine = {k.split("/", 1)[1]: k for k in ours.keys() if k.startswith(comp + "/")}
        assert set(tensors) == set(mine), comp
        for key, value in tensors.items():
            got = ours.get(mine[key])
            assert got.shape == value.shape and torch.equal(got, value), f"{comp}/{key}"
