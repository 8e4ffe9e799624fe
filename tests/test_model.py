"""The pure-torch SD1 network: exact LDM key set at real and tiny sizes, and agreement with diffusers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from loratool.arch import checkpoint_layout
from loratool.detect import detect_checkpoint
from loratool.io.source import open_file
from loratool.train.model import build_model, infer_config, load_model, schedule_tensors, tiny_specs
from loratool.train.model.unet import timestep_embedding

TINY_BASE = Path(__file__).resolve().parent.parent / "loratool" / "assets" / "tiny-sd1.safetensors"


def test_real_sd15_shapes_on_meta_device():
    layout = checkpoint_layout("sd1", "ldm")
    cfg = infer_config(layout)
    assert cfg.unet.model_channels == 320 and cfg.unet.channel_mult == (1, 2, 4, 4)
    assert cfg.unet.attention_levels == (True, True, True, False) and cfg.unet.context_dim == 768
    assert (cfg.text.width, cfg.text.layers, cfg.text.vocab_size, cfg.text.heads) == (768, 12, 49408, 12)
    assert (cfg.vae.channels, cfg.vae.channel_mult, cfg.vae.z_channels) == (128, (1, 2, 4, 4), 4)
    sd = build_model(cfg, "meta", init=False).state_dict()
    assert set(sd) | set(schedule_tensors()) == set(layout)
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: layout[k].shape for k in sd}


def test_tiny_fixture_is_an_sd1_checkpoint():
    src = open_file(TINY_BASE)
    specs = {k: src.spec(k) for k in src.keys()}
    assert set(specs) == set(checkpoint_layout("sd1", "ldm"))
    assert {k: s.shape for k, s in specs.items()} == {k: s.shape for k, s in tiny_specs().items()}
    match = detect_checkpoint(specs)
    assert (match.arch, match.naming) == ("sd1", "ldm")
    model = load_model(TINY_BASE)
    for k, v in model.state_dict().items():
        assert torch.equal(v, src.get(k).to(v.dtype)), k


def test_schedule_is_sd1():
    s = schedule_tensors()
    assert s["betas"][0].item() == pytest.approx(0.00085) and s["betas"][-1].item() == pytest.approx(0.012)
    torch.testing.assert_close(s["alphas_cumprod"], torch.cumprod(1 - s["betas"].double(), 0).float())


def test_timestep_embedding_odd_dim_pads():
    e = timestep_embedding(torch.tensor([0.0, 5.0]), 5)
    assert e.shape == (2, 5) and torch.all(e[:, -1] == 0)
    torch.testing.assert_close(e[0, :2], torch.ones(2))  # cos(0) = 1


def _diffusers_state(model, component: str, prefix: str) -> dict[str, torch.Tensor]:
    from loratool.arch.sd_checkpoint import checkpoint_links

    sd = model.state_dict()
    out = {}
    for link in checkpoint_links("sd1").links:
        comp, key = link.diffusers_key.split("/", 1)
        if comp != component or not link.ldm_key.startswith(prefix):
            continue
        t = sd[link.ldm_key]
        if link.transform == "conv1x1_linear":
            t = t.reshape(t.shape[0], t.shape[1])
        elif link.transform == "transpose":
            t = t.T
        out[key] = t
    return out


needs_diffusers = pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="diffusers is not installed")
needs_links = pytest.mark.skipif(
    importlib.util.find_spec("loratool.arch.sd_checkpoint") is None,
    reason="loratool.arch.sd_checkpoint (LDM ↔ diffusers key links) is not available",
)


@needs_diffusers
@needs_links
def test_unet_matches_diffusers(fixtures):
    from diffusers import UNet2DConditionModel

    model = load_model(TINY_BASE)
    cfg = model.cfg.unet
    ref = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=cfg.num_res_blocks,
        block_out_channels=tuple(cfg.model_channels * m for m in cfg.channel_mult),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=cfg.context_dim, attention_head_dim=cfg.num_heads, norm_num_groups=cfg.groups,
    )
    missing, unexpected = ref.load_state_dict(_diffusers_state(model, "unet", "model.diffusion_model."), strict=True)
    assert not missing and not unexpected
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 8, generator=gen)
    ctx = torch.randn(2, 77, cfg.context_dim, generator=gen)
    t = torch.tensor([3, 777])
    with torch.no_grad():
        ours = model.unet(x, t, ctx)
        theirs = ref(x, t, encoder_hidden_states=ctx).sample
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


@needs_diffusers
@needs_links
def test_vae_matches_diffusers(fixtures):
    from diffusers import AutoencoderKL

    model = load_model(TINY_BASE)
    cfg = model.cfg.vae
    n = len(cfg.channel_mult)
    ref = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=cfg.z_channels, layers_per_block=cfg.num_res_blocks,
        block_out_channels=tuple(cfg.channels * m for m in cfg.channel_mult), norm_num_groups=cfg.groups,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
    )
    ref.load_state_dict(_diffusers_state(model, "vae", "first_stage_model."), strict=True)
    img = torch.rand(1, 3, 64, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        ours = model.vae.encode(img)
        theirs = ref.encode(img).latent_dist.mean * 0.18215
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(model.vae.decode(ours), ref.decode(theirs / 0.18215).sample, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed")
@needs_links
def test_text_encoder_matches_transformers(fixtures):
    from transformers import CLIPTextConfig, CLIPTextModel

    model = load_model(TINY_BASE)
    cfg = model.cfg.text
    ref = CLIPTextModel(CLIPTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads, max_position_embeddings=cfg.max_positions, hidden_act="quick_gelu",
        bos_token_id=cfg.vocab_size - 2, eos_token_id=cfg.vocab_size - 1, pad_token_id=cfg.vocab_size - 1,
    ))
    state = _diffusers_state(model, "text_encoder", "cond_stage_model.")
    if not any(k.startswith("text_model.") for k in ref.state_dict()):  # transformers ≥ 5 drops the prefix
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing)
    ids = torch.randint(0, cfg.vocab_size, (2, cfg.max_positions), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model.text_encoder(ids), ref(ids).last_hidden_state, atol=1e-5, rtol=1e-4)
