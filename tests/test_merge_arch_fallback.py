"""An adapter whose keys fit SD1 and SD2 equally (UNet self-attention only) takes the base's arch."""

import torch
from support.synth import make_lora

from loratool.cli import main
from loratool.errors import DetectionError
from loratool.io.output import save_tensors
from loratool.io.source import open_file


def test_ambiguous_adapter_takes_base_arch(tmp_path, fixtures):
    lora = {k: v for k, v in make_lora("sd1", seed=5).items() if "attn1" in k and "lora_unet" in k}
    path = save_tensors(tmp_path / "attn1.safetensors", lora)
    from loratool.adapters import load_adapter

    try:
        load_adapter(open_file(path))
        ambiguous = False
    except DetectionError:
        ambiguous = True
    assert ambiguous, "fixture should be ambiguous between sd1 and sd2"
    out = tmp_path / "merged.safetensors"
    assert main(["merge", str(fixtures / "sd15-tiny.safetensors"), f"{path}:1.0", "-o", str(out), "--json"]) == 0
    base, merged = open_file(fixtures / "sd15-tiny.safetensors"), open_file(out)
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    assert not torch.equal(base.get(key), merged.get(key))
