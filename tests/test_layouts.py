"""Properties of the generated key bijection and of the adapter module tables."""

from __future__ import annotations

import pytest

from loratool.adapters import best_arch, index_adapter
from loratool.arch import _FILE_PREFIX, SD_ARCHES, _read, adapter_layout, adapter_layout_names, checkpoint_layout, kohya_modules
from loratool.arch.sd_checkpoint import (
    KeyLink,
    checkpoint_links,
    diffusers_links,
    ldm_link,
    linked_shape,
    one_sided_reason,
    sized_link,
)
from loratool.arch.sd_naming import all_modules, generated_modules, lycoris_modules, module_index


@pytest.mark.parametrize("arch", SD_ARCHES)
def test_every_table_key_is_linked_or_one_sided(arch):
    links = checkpoint_links(arch)
    ldm, dif = checkpoint_layout(arch, "ldm"), checkpoint_layout(arch, "diffusers")
    linked_ldm = {lk.ldm_key for lk in links.links}
    linked_dif = [lk.diffusers_key for lk in links.links]
    assert len(linked_dif) == len(set(linked_dif)), "a diffusers key is linked twice"
    assert linked_ldm.isdisjoint(links.ldm_only)
    assert linked_ldm | set(links.ldm_only) == set(ldm), "single-file leftovers"
    assert set(linked_dif) | set(links.diffusers_only) == set(dif), "diffusers leftovers"
    assert all(links.ldm_only.values()) and all(links.diffusers_only.values()), "one-sided keys need a reason"


def test_one_sided_counts_match_the_reference_notes():
    # sd15: 12 schedule buffers + model_ema.{decay,num_updates} + position_ids
    assert len(checkpoint_links("sd1").ldm_only) == 15
    # sd21: 12 buffers + resblocks.23 (12 keys) + text_projection + logit_scale
    sd2 = checkpoint_links("sd2").ldm_only
    assert len(sd2) == 26
    assert sum(".resblocks.23." in k for k in sd2) == 12
    # sdxl: position_ids + logit_scale
    assert set(checkpoint_links("sdxl").ldm_only) == {
        "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
        "conditioner.embedders.1.model.logit_scale",
    }


@pytest.mark.parametrize("arch", SD_ARCHES)
def test_shapes_agree_after_transform(arch):
    ldm, dif = checkpoint_layout(arch, "ldm"), checkpoint_layout(arch, "diffusers")
    for lk in checkpoint_links(arch).links:
        assert linked_shape(lk, ldm[lk.ldm_key].shape) == dif[lk.diffusers_key].shape, lk
        if lk.rows is not None:
            # the three slices tile the fused tensor exactly
            group = checkpoint_links(arch).by_ldm[lk.ldm_key]
            assert [g.rows for g in group] == [(i * (ldm[lk.ldm_key].shape[0] // 3), (i + 1) * (ldm[lk.ldm_key].shape[0] // 3))
                                               for i in range(3)]


@pytest.mark.parametrize("arch", SD_ARCHES)
def test_round_trip_on_names_is_identity(arch):
    links = checkpoint_links(arch)
    for key in checkpoint_layout(arch, "ldm"):
        forward = diffusers_links(arch, key)
        if key in links.ldm_only:
            assert forward == [] and one_sided_reason(arch, key, "ldm")
            continue
        for lk in forward:
            back = ldm_link(arch, lk.diffusers_key)  # computed by the inverse rules, not a table lookup
            assert back == lk
    for key in checkpoint_layout(arch, "diffusers"):
        lk = ldm_link(arch, key)
        assert lk is not None and key in [x.diffusers_key for x in diffusers_links(arch, lk.ldm_key)]


def test_transforms_are_where_the_reference_says():
    sd1 = checkpoint_links("sd1").by_diffusers
    to_out = "vae/decoder.mid_block.attentions.0.to_out.0.weight"
    assert sd1[to_out] == KeyLink("first_stage_model.decoder.mid.attn_1.proj_out.weight", to_out, None, "conv1x1_linear")
    assert sd1["vae/decoder.mid_block.attentions.0.to_out.0.bias"].transform is None
    assert sum(lk.transform == "conv1x1_linear" for lk in sd1.values()) == 8
    xl = checkpoint_links("sdxl").by_diffusers
    assert xl["text_encoder_2/text_projection.weight"].ldm_key == "conditioner.embedders.1.model.text_projection"
    assert xl["text_encoder_2/text_projection.weight"].transform == "transpose"
    assert [lk.transform for lk in checkpoint_links("sd2").links if lk.transform] == ["conv1x1_linear"] * 8
    # block-index facts from the reference notes
    assert xl["unet/up_blocks.0.upsamplers.0.conv.weight"].ldm_key == "model.diffusion_model.output_blocks.2.2.conv.weight"
    assert sd1["unet/up_blocks.0.upsamplers.0.conv.weight"].ldm_key == "model.diffusion_model.output_blocks.2.1.conv.weight"
    assert xl["unet/add_embedding.linear_1.weight"].ldm_key == "model.diffusion_model.label_emb.0.0.weight"
    vae_up = sd1["vae/decoder.up_blocks.0.upsamplers.0.conv.weight"]
    assert vae_up.ldm_key == "first_stage_model.decoder.up.3.upsample.conv.weight"


def test_fused_rows_follow_the_shape_config():
    from loratool.arch import standard_config

    k_link = next(lk for lk in checkpoint_links("sd2").links if lk.diffusers_key.endswith("layers.0.self_attn.k_proj.weight"))
    assert k_link.rows == (1024, 2048)
    assert sized_link(k_link, standard_config("sd2").replace(text_width=16)).rows == (16, 32)
    assert sized_link(k_link, standard_config("sd2")).rows == (1024, 2048)


def _mapping_rows(arch):
    for line in _read(f"{_FILE_PREFIX[arch]}-lora-kohya-to-ldm.tsv").splitlines():
        if line:
            yield line.split("\t")


@pytest.mark.parametrize("arch", SD_ARCHES)
def test_links_agree_with_kohya_mapping_tables(arch):
    by_dif = checkpoint_links(arch).by_diffusers
    n = 0
    for name, _kind, ldm_key, rows, _shape, dkey in _mapping_rows(arch):
        lk = by_dif[dkey]
        assert lk.ldm_key == ldm_key, name
        assert lk.rows == (tuple(int(x) for x in rows.split(":")) if rows else None), name
        n += 1
    assert n == len(kohya_modules(arch))


# ----------------------------------------------------------------------------- module names


@pytest.mark.parametrize("arch", SD_ARCHES)
def test_module_names_unique_and_kohya_is_subset(arch):
    mods = all_modules(arch)
    gen = generated_modules(arch)
    assert set(mods) == set(gen)
    addresses = [(t.address, t.rows) for t in mods.values()]
    assert len(addresses) == len(set(addresses)), "two names for one weight"
    peft = [t.peft_module for t in mods.values()]
    assert len(peft) == len(set(peft))
    for name, target in kohya_modules(arch).items():
        assert mods[name] == target
        g = gen[name]
        assert (g.address, g.rows, g.shape, g.diffusers_key) == (target.address, target.rows, target.shape, target.diffusers_key)
        if g.kind != target.kind:
            # only SD2's proj layers: linear weights that kohya trains as 1x1 convs
            assert arch == "sd2" and name.endswith(("_proj_in", "_proj_out")) and (g.kind, target.kind) == ("linear", "conv1x1")


@pytest.mark.parametrize("arch", SD_ARCHES)
def test_all_modules_cover_every_adaptable_weight(arch):
    ldm = checkpoint_layout(arch, "ldm")
    covered = {(t.address, t.rows) for t in all_modules(arch).values()}
    for lk in checkpoint_links(arch).links:
        comp = lk.diffusers_key.split("/")[0]
        shape = ldm[lk.ldm_key].shape
        weight = lk.diffusers_key.endswith(".weight") and len(shape) in (2, 4)
        skip = "embedding" in lk.diffusers_key or "text_projection" in lk.diffusers_key
        if comp != "vae" and weight and not skip:
            assert (lk.ldm_key, lk.rows) in covered, lk


def test_module_counts_and_names():
    assert len(generated_modules("sd1")) == 354
    sd1 = all_modules("sd1")
    assert sd1["lora_unet_conv_in"].address == "model.diffusion_model.input_blocks.0.0.weight"
    assert sd1["lora_unet_time_embedding_linear_1"].address == "model.diffusion_model.time_embed.0.weight"
    xl = all_modules("sdxl")
    for name in ("lora_unet_input_blocks_0_0", "lora_unet_time_embed_0", "lora_unet_label_emb_0_0", "lora_unet_out_2"):
        assert name in xl
    assert xl["lora_unet_label_emb_0_0"].diffusers_key == "unet/add_embedding.linear_1.weight"
    assert xl["lora_te2_text_model_encoder_layers_0_self_attn_v_proj"].rows == (2560, 3840)
    assert sum(t.component == "unet" for t in lycoris_modules("sd1").values()) == 282
    assert lycoris_modules("sdxl") == kohya_modules("sdxl")


@pytest.mark.parametrize("arch", SD_ARCHES)
def test_every_adapter_table_maps_completely(arch):
    names = adapter_layout_names(arch)
    assert names
    for naming in names:
        specs = adapter_layout(arch, naming)
        assert index_adapter(specs, arch).unmapped == [], naming
        best, index = best_arch(specs)[:2]
        assert index.unmapped == [] and index.arch == arch, naming


def test_lycoris_tables_are_exactly_the_full_preset():
    for naming in ("lycoris-loha", "lycoris-lokr"):
        modules = {k.split(".")[0] for k in adapter_layout("sd1", naming)}
        assert modules == set(lycoris_modules("sd1"))


@pytest.mark.parametrize("arch", SD_ARCHES)
def test_module_index_knows_kohya_and_peft_names(arch):
    index = module_index(arch)
    for target in all_modules(arch).values():
        assert index[target.name] == ("kohya", target)
        assert index[target.peft_module] == ("peft", target)
    assert any(k.startswith("text_encoder.text_model.") for k in index)
    if arch == "sdxl":
        assert any(k.startswith("text_encoder_2.text_model.") for k in index)
