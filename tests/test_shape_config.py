"""Shape configs: every tensor size follows from a few numbers, and a file's config is read off its shapes."""

from __future__ import annotations

import pytest

from loratool.arch import ARCHES, checkpoint_layout, kohya_modules, layout_in, shape_rules, standard_config
from loratool.arch.sd import component_of_key


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("naming", ["ldm", "diffusers"])
def test_released_shapes_solve_to_the_standard_config(arch, naming):
    rules = shape_rules(arch)
    layout = checkpoint_layout(arch, naming)
    sol = rules.solve((component_of_key(k)[0], s.shape, s.shape) for k, s in layout.items())
    assert sol.config == standard_config(arch)
    assert sol.ratio == 1
    assert layout_in(arch, naming, sol.config) == layout


# A genuine small SD1: hand-picked numbers, not a uniform fraction of the released ones.
SMALL_SD1 = dict(unet_channels=8, context_dim=40, text_width=40, vocab_size=100, max_positions=16, vae_channels=4)


def test_a_small_config_is_read_back_exactly():
    config = standard_config("sd1").replace(**SMALL_SD1)
    specs = layout_in("sd1", "ldm", config)
    full = checkpoint_layout("sd1", "ldm")
    # spot checks written out by hand from what the config means
    assert specs["model.diffusion_model.input_blocks.0.0.weight"].shape == (8, 4, 3, 3)
    assert specs["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape == (8, 40)
    assert specs["model.diffusion_model.input_blocks.7.1.transformer_blocks.0.ff.net.0.proj.weight"].shape == (4 * 8 * 8, 4 * 8)
    assert specs["model.diffusion_model.time_embed.0.weight"].shape == (32, 8)
    assert specs["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"].shape == (100, 40)
    assert specs["cond_stage_model.transformer.text_model.embeddings.position_embedding.weight"].shape == (16, 40)
    assert specs["cond_stage_model.transformer.text_model.encoder.layers.3.mlp.fc1.weight"].shape == (160, 40)
    assert specs["first_stage_model.encoder.down.3.block.1.conv2.weight"].shape == (16, 16, 3, 3)
    assert specs["first_stage_model.quant_conv.weight"].shape == (8, 8, 1, 1)
    assert specs["alphas_cumprod"].shape == (1000,)
    rules = shape_rules("sd1")
    sol = rules.solve((component_of_key(k)[0], full[k].shape, s.shape) for k, s in specs.items())
    assert sol.config == config


def test_fused_rows_and_module_targets_follow_the_config():
    config = standard_config("sdxl").replace(text_width_2=24, unet_channels=8)
    t = kohya_modules("sdxl")["lora_te2_text_model_encoder_layers_0_self_attn_v_proj"]
    assert t.rows == (2560, 3840) and t.shape == (3840, 1280)
    s = t.sized(config)
    assert s.rows == (48, 72) and s.shape == (72, 24) and s.target_shape == (24, 24)
    conv = kohya_modules("sdxl")["lora_unet_input_blocks_4_0_in_layers_2"]
    assert conv.sized(config).shape == (16, 8, 3, 3)


def test_votes_that_do_not_divide_leave_the_standard_value():
    rules = shape_rules("sd1")
    # 1281 is no multiple of anything: it votes for nothing; the odd tensor then fails the shape check
    sol = rules.solve([("unet", (1280, 320), (1281, 8)), ("unet", (320, 320), (8, 8))])
    assert sol.config["unet_channels"] == 8
    assert rules.shape("unet", (1280, 320), sol.config) == (32, 8)


@pytest.mark.parametrize("arch", ARCHES)
def test_no_size_is_explained_twice(arch):
    # building the size map raises on a collision (two dimensions explaining one released size)
    rules = shape_rules(arch)
    for comp in ("unet", "text_encoder", "vae"):
        assert rules.term(comp, 3) is None and rules.term(comp, 1) is None  # kernels and RGB are constants
