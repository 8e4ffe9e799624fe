"""The real consumers judge our outputs: diffusers, transformers and PEFT load what we write, unmodified.

* every diffusers folder we convert (SD1, SD2, SDXL fixtures and the tiny SD1 base) loads with
  ``*Pipeline.from_pretrained(folder)`` offline with no extra arguments, and runs a denoising step;
* its UNet / text encoder give the same outputs as loratool's own SD1 model on the same weights;
* LoRAs we write in kohya, PEFT and diffusers names load with diffusers' ``load_lora_weights`` and,
  fused, give exactly the weights of ``loratool merge``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from loratool.arch import kohya_modules  # noqa: E402
from loratool.cli import main  # noqa: E402
from loratool.io.output import save_tensors  # noqa: E402
from loratool.io.source import open_file  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "loratool" / "assets" / "tiny-sd1.safetensors"
FOLDERS = [("sd15-tiny", "fixtures"), ("sd21-tiny", "fixtures"), ("sdxl-tiny", "fixtures"), ("tiny-sd1", "loratool/assets")]


def _convert(tmp_path: Path, name: str, where: str) -> Path:
    out = tmp_path / name
    assert main(["convert", str(ROOT / where / f"{name}.safetensors"), str(out), "--to", "diffusers"]) == 0
    return out


def _pipeline_class(folder: Path):
    import json

    import diffusers

    return getattr(diffusers, json.loads((folder / "model_index.json").read_text())["_class_name"])


@pytest.mark.parametrize("name,where", FOLDERS)
def test_converted_folder_loads_as_a_pipeline_and_denoises(tmp_path, name, where):
    folder = _convert(tmp_path, name, where)
    cls = _pipeline_class(folder)
    cls.from_pretrained(folder, local_files_only=True)  # no extra arguments
    pipe = cls.from_pretrained(folder, local_files_only=True, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    latents = pipe("a photo of a cat", num_inference_steps=1, height=64, width=64, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images
    assert latents.shape == (1, 4, 8, 8) and bool(torch.isfinite(latents).all())
    expected = "v_prediction" if name.startswith("sd21") else "epsilon"
    assert pipe.scheduler.config.prediction_type == expected


def test_tiny_base_folder_agrees_with_our_model(tmp_path):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from loratool.train.model import load_model

    folder = _convert(tmp_path, "tiny-sd1", "loratool/assets")
    ours = load_model(TINY)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32)
    text, info = CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    ctx = torch.randn(2, 77, ours.cfg.unet.context_dim, generator=gen)
    t = torch.tensor([10, 900])
    ids = torch.randint(0, ours.text_encoder.cfg.vocab_size, (2, 77), generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, encoder_hidden_states=ctx).sample, ours.unet.float()(x, t, ctx),
                                   atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(text(ids).last_hidden_state, ours.text_encoder.float()(ids), atol=1e-4, rtol=1e-4)


def test_sdxl_text_encoders_load_in_transformers(tmp_path):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder = _convert(tmp_path, "sdxl-tiny", "fixtures")
    for cls, comp in ((CLIPTextModel, "text_encoder"), (CLIPTextModelWithProjection, "text_encoder_2")):
        model, info = cls.from_pretrained(folder / comp, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], comp
        src = open_file(folder / comp / "model.safetensors")
        state = _file_names(model.state_dict())
        assert set(state) == set(src.keys()), comp
        for key in src.keys():
            assert torch.equal(state[key], src.get(key).to(state[key].dtype)), key


def _file_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5's CLIPTextModel drops the ``text_model.`` prefix of the saved names in state_dict()."""
    return {k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}": v for k, v in state.items()}


def _tiny_kohya_lora(path: Path, rank: int = 2, alpha: float = 1.5) -> Path:
    """A random kohya LoRA for the tiny base: every linear / 1x1 kohya module, shapes read from the base."""
    base = open_file(TINY)
    gen = torch.Generator().manual_seed(7)
    tensors = {}
    for name, t in kohya_modules("sd1").items():
        if t.kind == "conv3x3":
            continue
        shape = base.spec(t.address).shape
        rows = (t.rows[1] - t.rows[0]) if t.rows else shape[0]
        tail = (1, 1) if t.kind == "conv1x1" else ()
        tensors[f"{name}.lora_down.weight"] = (torch.randn(rank, shape[1], *tail, generator=gen) * 0.3).half()
        tensors[f"{name}.lora_up.weight"] = (torch.randn(rows, rank, *tail, generator=gen) * 0.3).half()
        tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float16)
    return save_tensors(path, tensors, {"ss_network_module": "networks.lora"})


@pytest.mark.parametrize("naming", ["kohya", "peft", "diffusers"])
def test_lora_outputs_load_in_diffusers_and_equal_our_merge(tmp_path, naming):
    lora = _tiny_kohya_lora(tmp_path / "lora.safetensors")
    if naming != "kohya":
        converted = tmp_path / f"lora-{naming}.safetensors"
        assert main(["convert", str(lora), str(converted), "--to", naming]) == 0
        lora = converted
    ratio = 0.7
    merged = tmp_path / "merged.safetensors"
    assert main(["merge", str(TINY), f"{lora}:{ratio}", "-o", str(merged), "--dtype", "fp32"]) == 0
    ours_folder = tmp_path / "merged-folder"
    assert main(["convert", str(merged), str(ours_folder), "--to", "diffusers"]) == 0
    base_folder = _convert(tmp_path, "tiny-sd1", "loratool/assets")

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(base_folder, local_files_only=True, torch_dtype=torch.float32)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    pipe.fuse_lora(lora_scale=ratio, components=["unet", "text_encoder"])
    pipe.unload_lora_weights()
    expected = open_file(ours_folder)
    changed = 0
    for comp, model in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder)):
        state = _file_names(model.state_dict()) if comp == "text_encoder" else model.state_dict()
        for key, value in state.items():
            want = expected.get(f"{comp}/{key}").float()
            torch.testing.assert_close(value.float(), want, atol=2e-3, rtol=2e-3, msg=f"{comp}/{key}")
            if comp == "unet" and not torch.equal(before[key], value):
                changed += 1
    assert changed >= 100  # the LoRA really changed the UNet
