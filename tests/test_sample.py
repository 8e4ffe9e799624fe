"""Sampling: prompt syntax, DDIM schedule, seeded PNGs, LoRA weight 0 = no LoRA, weight changes the image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support.synth import make_lora

from loratool.cli import main
from loratool.errors import LoratoolError
from loratool.io.output import save_tensors
from loratool.train.model import load_model
from loratool.train.sample import LoraRef, apply_lora, ddim_timesteps, parse_prompt, parse_size

BASE = Path(__file__).resolve().parent.parent / "loratool" / "assets" / "tiny-sd1.safetensors"



def test_parse_prompt():
    assert parse_prompt("a <lora:blob:0.8> photo <lora:style>, red") == (
        "a photo , red", [LoraRef("blob", 0.8), LoraRef("style", 1.0)])
    assert parse_prompt("<lora:x:-0.5:0.2>")[1] == [LoraRef("x", -0.5)]
    with pytest.raises(LoratoolError, match="not a number"):
        parse_prompt("<lora:x:abc>")


def test_ddim_timesteps_and_size():
    assert ddim_timesteps(4) == [751, 501, 251, 1]
    assert len(ddim_timesteps(50)) == 50 and ddim_timesteps(50)[-1] == 1
    assert parse_size("192x64", 128) == (192, 64) and parse_size(None, 128) == (128, 128)
    with pytest.raises(LoratoolError, match="multiples of 64"):
        parse_size("100", 128)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    tensors = make_lora("sd1", rank=2, alpha=2.0, factor=32, seed=5)
    tensors = {k: (v * 20 if k.endswith("lora_up.weight") else v) for k, v in tensors.items()}
    save_tensors(d / "synth.safetensors", tensors, {"ss_base_model_version": "sd_v1"})
    return d


def test_apply_lora_weight_zero_is_identity(lora_dir):
    model = load_model(BASE)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert apply_lora(model, lora_dir / "synth.safetensors", 0.0) > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_sample_cli_is_seeded_and_applies_loras(tmp_path, lora_dir):
    def run(name: str, prompt: str, seed: int = 0) -> np.ndarray:
        out = tmp_path / name
        code = main(["sample", "--base", str(BASE), "--prompt", prompt, "--lora-dir", str(lora_dir), "--steps", "4",
                     "--size", "64", "--seed", str(seed), "-o", str(out)])
        assert code == 0
        return _png(out)

    a = run("a.png", "sks blob")
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, run("b.png", "sks blob"))
    assert not np.array_equal(a, run("c.png", "sks blob", seed=1))
    assert np.array_equal(a, run("d.png", "sks blob <lora:synth:0>"))
    assert not np.array_equal(a, run("e.png", "sks blob <lora:synth:1>"))
    assert main(["sample", "--prompt", "x <lora:missing>", "--lora-dir", str(lora_dir), "-o", str(tmp_path / "f.png")]) == 2
