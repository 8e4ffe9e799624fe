"""FLUX.1: detection from the reference tables, module names, shape config, and merges on fused row slices."""

from __future__ import annotations

import pytest
import torch
from support.synth import FLUX_SMALL, iter_lora, make_lora, split_qkv_lora, tiny_config, write_checkpoint

from loratool.arch import adapter_layout, adapter_layout_names, checkpoint_layout, kohya_modules, shape_rules
from loratool.arch.flux import component_of_key
from loratool.arch.flux_naming import module_index, split_modules
from loratool.cli import main
from loratool.detect import detect_file
from loratool.io.output import save_tensors
from loratool.io.source import TensorSpec, open_file

H = FLUX_SMALL["hidden_size"]


def lora_delta_ref(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """ΔW of a linear LoRA module, written out: Σ_r up[o, r] · down[r, i]."""
    return torch.einsum("or,ri->oi", up.double(), down.double()).float()


@pytest.mark.parametrize("naming", ["ldm", "diffusers"])
def test_released_transformer_tables_are_flux_dev(naming):
    det = detect_file(checkpoint_layout("flux1", naming))
    assert (det.kind, det.arch, det.naming) == ("checkpoint", "flux1", naming)
    assert det.description.startswith("FLUX.1-dev ")


def test_schnell_fill_and_depth_are_named():
    schnell = detect_file({k: TensorSpec(tuple(int(x) for x in s.split(",")), "BF16")
                           for k, s in (line.split("\t")[:2] for line in _lines("flux1-schnell-bfl.tsv"))})
    assert schnell.description.startswith("FLUX.1-schnell ")
    for width, name in ((384, "fill"), (128, "depth")):
        specs = dict(checkpoint_layout("flux1", "ldm"))
        specs["img_in.weight"] = TensorSpec((3072, width), "BF16")
        assert detect_file(specs).description.startswith(f"FLUX.1-{name} ")
        sol = shape_rules("flux1").solve(("transformer", checkpoint_layout("flux1", "ldm")[k].shape, s.shape, k)
                                         for k, s in specs.items())
        assert sol.config["in_channels"] == width and sol.config["out_channels"] == 64


def _lines(name):
    from loratool.arch import _read

    return [line for line in _read(name).splitlines() if line]


@pytest.mark.parametrize("naming", adapter_layout_names("flux1"))
def test_every_flux_adapter_table_maps(naming):
    specs = adapter_layout("flux1", naming)
    det = detect_file(specs)
    assert (det.kind, det.arch) == ("adapter", "flux1")
    index = det.adapter_index
    mapped = [k for roles in index.modules.values() for k in roles.values()]
    assert sorted(mapped + index.unmapped) == sorted(specs)
    assert not index.unmapped, index.unmapped[:3]  # norm_out.linear too (its halves are swapped in BFL)


def test_fused_and_split_targets_follow_the_tables():
    qkv = kohya_modules("flux1")["lora_unet_double_blocks_3_img_attn_qkv"]
    assert (qkv.address, qkv.rows, qkv.shape) == ("double_blocks.3.img_attn.qkv.weight", None, (9216, 3072))
    split = split_modules()
    k = split["lora_transformer_transformer_blocks_3_attn_to_k"]
    assert (k.address, k.rows) == ("double_blocks.3.img_attn.qkv.weight", (3072, 6144))
    mlp = split["lora_transformer_single_transformer_blocks_5_proj_mlp"]
    assert (mlp.address, mlp.rows) == ("single_blocks.5.linear1.weight", (9216, 21504))
    add_v = module_index()["transformer.transformer_blocks.0.attn.add_v_proj"][1]
    assert (add_v.address, add_v.rows) == ("double_blocks.0.txt_attn.qkv.weight", (6144, 9216))
    comfy = module_index()["diffusion_model.single_blocks.2.linear1"][1]
    assert comfy.name == "lora_unet_single_blocks_2_linear1"
    # in the small config: q/k/v are H rows each, the MLP 4H
    small = tiny_config("flux1", 64)
    assert k.sized(small).rows == (H, 2 * H) and mlp.sized(small).rows == (3 * H, 7 * H)
    assert component_of_key("model.diffusion_model.double_blocks.0.img_mod.lin.weight")[0] == "transformer"
    assert component_of_key("text_encoders.t5xxl.transformer.encoder.final_layer_norm.weight")[0] == "text_encoder_2"


@pytest.fixture(scope="module")
def flux_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("flux")
    write_checkpoint(d / "base.safetensors", "flux1", factor=64, dtype="F32")
    kohya = make_lora("flux1", rank=4, alpha=2.0, components=("transformer",), dtype="F32")
    save_tensors(d / "kohya.safetensors", kohya)
    peft = dict(iter_lora("flux1", rank=3, naming="peft", modules=split_modules(), dtype="F32", components=("transformer",)))
    save_tensors(d / "peft.safetensors", peft)
    return d, kohya, peft


def test_merge_kohya_and_peft_into_bfl_equals_the_formula(flux_files):
    d, kohya, peft = flux_files
    out = d / "merged.safetensors"
    assert main(["merge", str(d / "base.safetensors"), f"{d / 'kohya.safetensors'}:0.8", f"{d / 'peft.safetensors'}:-0.5",
                 "-o", str(out)]) == 0
    with open_file(d / "base.safetensors") as b, open_file(out) as m:
        # kohya fused module: the whole img_attn.qkv of double block 7 (3H rows), scale alpha/rank = 2/4
        key = "double_blocks.7.img_attn.qkv.weight"
        want = b.get(key).clone()
        n = "lora_unet_double_blocks_7_img_attn_qkv"
        want += 0.8 * 0.5 * lora_delta_ref(kohya[f"{n}.lora_up.weight"], kohya[f"{n}.lora_down.weight"])
        # PEFT split modules on the same tensor: to_q rows [0:H], to_k [H:2H], to_v [2H:3H]; no alpha ⇒ scale 1
        for part, (lo, hi) in (("to_q", (0, H)), ("to_k", (H, 2 * H)), ("to_v", (2 * H, 3 * H))):
            p = f"transformer.transformer_blocks.7.attn.{part}"
            want[lo:hi] += -0.5 * lora_delta_ref(peft[f"{p}.lora_B.weight"], peft[f"{p}.lora_A.weight"])
        torch.testing.assert_close(m.get(key), want, rtol=1e-5, atol=1e-6)
        # single block linear1: PEFT proj_mlp is rows [3H:7H]; the kohya module covers all 7H rows
        key = "single_blocks.11.linear1.weight"
        want = b.get(key).clone()
        n = "lora_unet_single_blocks_11_linear1"
        want += 0.8 * 0.5 * lora_delta_ref(kohya[f"{n}.lora_up.weight"], kohya[f"{n}.lora_down.weight"])
        p = "transformer.single_transformer_blocks.11.proj_mlp"
        want[3 * H: 7 * H] += -0.5 * lora_delta_ref(peft[f"{p}.lora_B.weight"], peft[f"{p}.lora_A.weight"])
        for part, (lo, hi) in (("to_q", (0, H)), ("to_k", (H, 2 * H)), ("to_v", (2 * H, 3 * H))):
            p = f"transformer.single_transformer_blocks.11.attn.{part}"
            want[lo:hi] += -0.5 * lora_delta_ref(peft[f"{p}.lora_B.weight"], peft[f"{p}.lora_A.weight"])
        torch.testing.assert_close(m.get(key), want, rtol=1e-5, atol=1e-6)
        # a weight no module targets is byte-identical
        assert torch.equal(m.get("final_layer.adaLN_modulation.1.bias"), b.get("final_layer.adaLN_modulation.1.bias"))


def test_flux_lora_for_another_width_is_refused(flux_files, tmp_path, capsys):
    d, _, _ = flux_files
    wide = make_lora("flux1", rank=2, factor=32, components=("transformer",), dtype="F32")  # the small config again
    wide = {k: (torch.cat([v, v], dim=-1) if k.endswith("lora_down.weight") else v) for k, v in wide.items()}
    save_tensors(tmp_path / "wide.safetensors", wide)
    rc = main(["merge", str(d / "base.safetensors"), str(tmp_path / "wide.safetensors"), "-o", str(tmp_path / "o.safetensors")])
    assert rc == 2
    assert not (tmp_path / "o.safetensors").exists()


def _flux_forward(folder):
    from diffusers import FluxTransformer2DModel

    model, info = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer", output_loading_info=True,
                                                         torch_dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    return model, _run(model)


def _run(model):
    g = torch.Generator().manual_seed(0)
    n, t = 16, 8
    with torch.no_grad():
        return model(
            hidden_states=torch.randn(1, n, 64, generator=g), encoder_hidden_states=torch.randn(1, t, 32, generator=g),
            pooled_projections=torch.randn(1, 16, generator=g), timestep=torch.tensor([0.5]), img_ids=torch.zeros(n, 3),
            txt_ids=torch.zeros(t, 3), guidance=torch.tensor([3.5]),
        ).sample


def test_bfl_diffusers_round_trip_and_diffusers_agrees_with_our_merge(flux_files, tmp_path):
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    d, _, peft = flux_files
    base, folder, back = d / "base.safetensors", tmp_path / "folder", tmp_path / "back.safetensors"
    assert main(["convert", str(base), str(folder), "--to", "diffusers"]) == 0
    assert main(["convert", str(folder), str(back), "--to", "ldm"]) == 0
    with open_file(base) as a, open_file(back) as b:  # BFL → diffusers → BFL is the identity, tensor by tensor
        assert sorted(a.keys()) == sorted(b.keys())
        assert all(a.spec(k) == b.spec(k) and torch.equal(a.get(k), b.get(k)) for k in a.keys())
    model, _ = _flux_forward(folder)
    # diffusers applies our PEFT file itself; the same LoRA merged by us, converted, must give the same output
    model.load_lora_adapter(str(d / "peft.safetensors"), prefix="transformer", adapter_name="x")
    theirs = _run(model)
    merged, merged_folder = tmp_path / "merged.safetensors", tmp_path / "merged"
    assert main(["merge", str(base), f"{d / 'peft.safetensors'}:1.0", "-o", str(merged)]) == 0
    assert main(["convert", str(merged), str(merged_folder), "--to", "diffusers"]) == 0
    _, ours = _flux_forward(merged_folder)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(theirs, _flux_forward(folder)[1], atol=1e-4)  # the LoRA does change the output



def test_fused_kohya_lora_splits_exactly_for_diffusers(flux_files, tmp_path):
    """A kohya LoRA on fused qkv / linear1: merged into a diffusers folder, or converted to PEFT names, it
    changes the weights exactly as the BFL merge does (the shared down is copied to each part, the up's rows
    are sliced; the rank is kept)."""
    d, kohya, _ = flux_files
    base, folder = d / "base.safetensors", tmp_path / "folder"
    assert main(["convert", str(base), str(folder), "--to", "diffusers"]) == 0
    bfl_merged, via_folder = tmp_path / "m.safetensors", tmp_path / "mf"
    assert main(["merge", str(base), f"{d / 'kohya.safetensors'}:0.7", "-o", str(bfl_merged)]) == 0
    assert main(["merge", str(folder), f"{d / 'kohya.safetensors'}:0.7", "-o", str(via_folder)]) == 0
    bfl_as_folder = tmp_path / "mbf"
    assert main(["convert", str(bfl_merged), str(bfl_as_folder), "--to", "diffusers"]) == 0
    with open_file(via_folder) as a, open_file(bfl_as_folder) as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for k in a.keys():
            torch.testing.assert_close(a.get(k), b.get(k), rtol=1e-6, atol=1e-7)
    peft = tmp_path / "peft.safetensors"
    assert main(["convert", str(d / "kohya.safetensors"), str(peft), "--to", "peft"]) == 0
    with open_file(peft) as p:
        keys = set(p.keys())
        assert "transformer.transformer_blocks.0.attn.to_k.lora_A.weight" in keys
        assert "transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight" in keys
        q_up = p.get("transformer.transformer_blocks.2.attn.to_q.lora_B.weight")
        v_up = p.get("transformer.transformer_blocks.2.attn.to_v.lora_B.weight")
        n = "lora_unet_double_blocks_2_img_attn_qkv"
        fold = 2.0 / 4  # alpha / rank folded into lora_B
        torch.testing.assert_close(q_up, kohya[f"{n}.lora_up.weight"][:H] * fold)
        torch.testing.assert_close(v_up, kohya[f"{n}.lora_up.weight"][2 * H: 3 * H] * fold)
        assert torch.equal(p.get("transformer.transformer_blocks.2.attn.to_k.lora_A.weight"), kohya[f"{n}.lora_down.weight"])
    via_peft = tmp_path / "mp.safetensors"
    assert main(["merge", str(base), f"{peft}:0.7", "-o", str(via_peft)]) == 0
    with open_file(via_peft) as a, open_file(bfl_merged) as b:
        for k in a.keys():
            torch.testing.assert_close(a.get(k), b.get(k), rtol=1e-6, atol=1e-7)


def test_resize_and_extract_flux(flux_files, tmp_path):
    d, _, _ = flux_files
    small = tmp_path / "r.safetensors"
    assert main(["resize", str(d / "kohya.safetensors"), "--rank", "4", "-o", str(small)]) == 0  # full rank: lossless
    from loratool.adapters import delta, load_adapter

    with open_file(d / "kohya.safetensors") as a, open_file(small) as b:
        la, lb = load_adapter(a), load_adapter(b)
        assert la.arch == lb.arch == "flux1"
        for name in list(la.modules)[::37]:
            torch.testing.assert_close(delta(lb.modules[name]), delta(la.modules[name]), rtol=1e-4, atol=1e-6)
    merged = tmp_path / "m.safetensors"
    assert main(["merge", str(d / "base.safetensors"), str(d / "kohya.safetensors"), "-o", str(merged)]) == 0
    out = tmp_path / "e.safetensors"
    assert main(["extract", str(merged), str(d / "base.safetensors"), "--rank", "4", "-o", str(out)]) == 0
    with open_file(out) as e, open_file(d / "kohya.safetensors") as k:
        le, lk = load_adapter(e), load_adapter(k)
        assert set(le.modules) == set(lk.modules)  # the 304 transformer modules, as kohya's extractor takes them
        name = "lora_unet_single_blocks_3_linear1"
        planted, got = delta(lk.modules[name]), delta(le.modules[name])
        assert float((got - planted).norm() / planted.norm()) < 1e-2  # the planted rank-4 ΔW, up to bf16 rounding


def test_gguf_is_refused_with_a_hint(tmp_path, capsys):
    f = tmp_path / "flux1-dev-Q8_0.gguf"
    f.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + bytes(64))
    assert main(["inspect", str(f)]) == 2
    err = capsys.readouterr().err
    assert "GGUF" in err and "dequantize" in err


def test_kohya_split_qkv_file_merges_as_sd_scripts_applies_it(flux_files, tmp_path):
    """split_qkv: per-part LoRAs (rank 4, alpha 2) stored as one module (downs stacked, up block-diagonal,
    alpha left per part); sd-scripts applies (alpha / 4) · up_i @ down_i to each part's rows."""
    d, _, _ = flux_files
    lora, downs, ups = split_qkv_lora(H)
    save_tensors(tmp_path / "split.safetensors", lora, {"ss_network_args": '{"split_qkv": "True"}'})
    out = tmp_path / "m.safetensors"
    assert main(["merge", str(d / "base.safetensors"), str(tmp_path / "split.safetensors"), "-o", str(out)]) == 0
    key = "double_blocks.1.img_attn.qkv.weight"
    with open_file(d / "base.safetensors") as b, open_file(out) as m:
        want = b.get(key).clone()
        for i in range(3):
            want[i * H:(i + 1) * H] += (2.0 / 4) * lora_delta_ref(ups[i], downs[i])
        torch.testing.assert_close(m.get(key), want, rtol=1e-5, atol=1e-6)


def test_comfyui_all_in_one_file_is_detected_and_merged(flux_files, tmp_path):
    """ComfyUI's single file: the BFL keys under model.diffusion_model., text encoders and VAE beside them."""
    d, kohya, _ = flux_files
    with open_file(d / "base.safetensors") as b:
        tensors = {"model.diffusion_model." + k: b.get(k) for k in b.keys()}
    clip = "text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    tensors[clip] = torch.zeros(48, 12)  # the small config's CLIP-L: width 12, MLP 4×
    tensors["vae.decoder.conv_in.weight"] = torch.zeros(8, 16, 3, 3)
    save_tensors(tmp_path / "comfy.safetensors", tensors)
    det = detect_file({k: TensorSpec(tuple(v.shape), "F32") for k, v in tensors.items()})
    assert (det.kind, det.arch, det.naming) == ("checkpoint", "flux1", "ldm")
    assert "ComfyUI single file" in det.description and "CLIP-L" in det.description
    lora = dict(kohya)
    te = "lora_te1_text_model_encoder_layers_0_mlp_fc1"
    g = torch.Generator().manual_seed(3)
    lora.update({f"{te}.lora_down.weight": torch.randn(2, 12, generator=g),
                 f"{te}.lora_up.weight": torch.randn(48, 2, generator=g), f"{te}.alpha": torch.tensor(2.0)})
    save_tensors(tmp_path / "lora.safetensors", lora)
    out = tmp_path / "m.safetensors"
    assert main(["merge", str(tmp_path / "comfy.safetensors"), f"{tmp_path / 'lora.safetensors'}:0.5", "-o", str(out)]) == 0
    with open_file(out) as m:
        key = "model.diffusion_model.single_blocks.0.linear2.weight"
        n = "lora_unet_single_blocks_0_linear2"
        want = tensors[key] + 0.5 * 0.5 * lora_delta_ref(kohya[f"{n}.lora_up.weight"], kohya[f"{n}.lora_down.weight"])
        torch.testing.assert_close(m.get(key), want, rtol=1e-5, atol=1e-6)
        want = 0.5 * 1.0 * lora_delta_ref(lora[f"{te}.lora_up.weight"], lora[f"{te}.lora_down.weight"])
        torch.testing.assert_close(m.get(clip), want, rtol=1e-5, atol=1e-6)
        assert torch.equal(m.get("vae.decoder.conv_in.weight"), tensors["vae.decoder.conv_in.weight"])


def test_scaled_fp8_base_stays_scaled_fp8(flux_files, tmp_path):
    """ComfyUI scaled fp8: W = stored · scale_weight. The merge computes in float32 and stores
    (W + ΔW) / scale_weight back in fp8 (same scale, clamped to ±448, round to nearest even)."""
    d, kohya, _ = flux_files
    with open_file(d / "base.safetensors") as b:
        src = {k: b.get(k) for k in b.keys()}
    tensors = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    for k, v in src.items():
        if k.endswith(".weight") and v.dim() == 2:
            s = float(v.abs().max()) / 448
            tensors[k] = (v / s).to(torch.float8_e4m3fn)
            tensors[k.removesuffix("weight") + "scale_weight"] = torch.tensor(s)
        else:
            tensors[k] = v
    save_tensors(tmp_path / "fp8.safetensors", tensors)
    assert "scaled fp8" in detect_file({k: TensorSpec(tuple(v.shape), "F8_E4M3") for k, v in tensors.items()}).description
    out = tmp_path / "m.safetensors"
    assert main(["merge", str(tmp_path / "fp8.safetensors"), f"{d / 'kohya.safetensors'}:0.9", "-o", str(out)]) == 0
    key, n = "single_blocks.4.linear1.weight", "lora_unet_single_blocks_4_linear1"
    s = tensors["single_blocks.4.linear1.scale_weight"]
    w = tensors[key].float() * s + 0.9 * 0.5 * lora_delta_ref(kohya[f"{n}.lora_up.weight"], kohya[f"{n}.lora_down.weight"])
    want = (w / s).clamp(-448, 448).to(torch.float8_e4m3fn)
    with open_file(out) as m:
        got = m.get(key)
        assert got.dtype == torch.float8_e4m3fn and torch.equal(m.get("single_blocks.4.linear1.scale_weight"), s)
        # one fp8 step at most: float32 summation order differs from the written-out formula
        assert float((got.float() - want.float()).abs().max()) <= float(want.float().abs().max()) / 8
        assert float((got.float() != want.float()).float().mean()) < 0.01


def test_diffusers_kohya_converter_maps_every_module_where_our_tables_say(tmp_path):
    """diffusers' own kohya → diffusers FLUX converter (it needs the real widths: a full-width rank-1 LoRA,
    ~10 MB) splits every fused module onto the same diffusers modules and rows as ours."""
    pytest.importorskip("diffusers")
    from diffusers import FluxPipeline

    from loratool.adapters import delta, load_adapter
    from loratool.adapters.io import split_fused

    lora = make_lora("flux1", rank=1, alpha=1.0, factor=1, components=("transformer",), dtype="BF16")
    path = tmp_path / "full-r1.safetensors"
    save_tensors(path, lora)
    theirs = FluxPipeline.lora_state_dict(str(path))
    theirs = theirs[0] if isinstance(theirs, tuple) else theirs
    with open_file(path) as src:
        ours = split_fused(load_adapter(src)).modules
    by_peft = {m.target.peft_module: m for m in ours.values()}
    modules = {k.removesuffix(".lora_A.weight") for k in theirs if k.endswith(".lora_A.weight")}
    assert modules == set(by_peft)  # the same 494 diffusers modules
    for name in sorted(modules)[::23]:
        a, b = theirs[f"{name}.lora_A.weight"].float(), theirs[f"{name}.lora_B.weight"].float()
        torch.testing.assert_close(b @ a, delta(by_peft[name]), rtol=2e-2, atol=1e-6)
