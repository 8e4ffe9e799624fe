"""`loratool convert` end to end on the fixtures: round trips are identities, errors exit 2."""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from support.synth import make_checkpoint, scaled_shape

from loratool.adapters import delta, load_adapter, module_shape
from loratool.arch import adapter_layout, kohya_modules
from loratool.cli import main
from loratool.io.output import save_tensors
from loratool.io.source import open_file
from loratool.ops.convert import PRUNE_RULES, convert, prune_reason


def run(*args: str) -> int:
    return main([str(a) for a in args])


def tensors_of(path) -> dict[str, torch.Tensor]:
    src = open_file(path)
    return {k: src.get(k) for k in src.keys()}


def deltas(path, arch=None) -> dict[str, torch.Tensor]:
    loaded = load_adapter(open_file(path), arch=arch)
    return {name: delta(m, module_shape(m)) for name, m in loaded.modules.items()}


def assert_same_deltas(a: dict, b: dict, rtol=2e-3):
    assert set(a) == set(b)
    for name in a:
        scale = float(a[name].abs().max()) or 1.0
        assert float((a[name] - b[name]).abs().max()) <= rtol * scale, name


# ----------------------------------------------------------------------------- containers


def test_safetensors_ckpt_safetensors_is_identity(fixtures, tmp_path):
    src = fixtures / "sd15-tiny.safetensors"
    assert run("convert", src, tmp_path / "m.ckpt") == 0
    assert run("convert", tmp_path / "m.ckpt", tmp_path / "m.safetensors") == 0
    a, b = open_file(src), open_file(tmp_path / "m.safetensors")
    assert a.keys() == b.keys()
    for k in a.keys():
        assert a.spec(k) == b.spec(k)
        assert torch.equal(a.get(k), b.get(k)), k
    # torch itself reads the streamed pickle (weights_only, and mmap: records are 64-byte aligned)
    sd = torch.load(tmp_path / "m.ckpt", weights_only=True, mmap=True)["state_dict"]
    assert set(sd) == set(a.keys()) and all(torch.equal(sd[k], a.get(k)) for k in a.keys())


def test_lora_pickle_is_a_plain_dict(fixtures, tmp_path):
    assert run("convert", fixtures / "sd15-lora-kohya.safetensors", tmp_path / "l.pt") == 0
    sd = torch.load(tmp_path / "l.pt", weights_only=True)
    assert "state_dict" not in sd
    assert set(sd) == set(open_file(fixtures / "sd15-lora-kohya.safetensors").keys())


def test_fp8_tensors_survive_ckpt(tmp_path):
    t = {"w": torch.tensor([1.0, -2.5, 448.0]).to(torch.float8_e4m3fn), "i": torch.arange(3)}
    save_tensors(tmp_path / "a.safetensors", t)
    assert run("convert", tmp_path / "a.safetensors", tmp_path / "a.ckpt") == 0
    sd = torch.load(tmp_path / "a.ckpt", weights_only=True)
    assert sd["w"].dtype == torch.float8_e4m3fn and torch.equal(sd["w"].float(), t["w"].float())
    back = tensors_of(tmp_path / "a.ckpt")
    assert torch.equal(back["w"].float(), t["w"].float()) and torch.equal(back["i"], t["i"])


def test_metadata_preserved_between_safetensors(fixtures, tmp_path):
    src = fixtures / "sd15-tiny.safetensors"
    assert run("convert", src, tmp_path / "o.safetensors", "--dtype", "fp32") == 0
    assert open_file(tmp_path / "o.safetensors").metadata == open_file(src).metadata


# ----------------------------------------------------------------------------- dtypes


def test_dtype_casts_floats_only(fixtures, tmp_path):
    src = fixtures / "sd15-tiny.safetensors"
    assert run("convert", src, tmp_path / "b.safetensors", "--dtype", "bf16") == 0
    a, b = open_file(src), open_file(tmp_path / "b.safetensors")
    pos = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    assert b.spec(pos).dtype == "I64" and torch.equal(a.get(pos), b.get(pos))
    assert b.spec("alphas_cumprod").dtype == "F32" and torch.equal(a.get("alphas_cumprod"), b.get("alphas_cumprod"))
    w = "model.diffusion_model.input_blocks.0.0.weight"
    assert b.spec(w).dtype == "BF16" and torch.equal(b.get(w), a.get(w).to(torch.bfloat16))
    assert {b.spec(k).dtype for k in b.keys()} == {"BF16", "F32", "I64", "I32"}  # model_ema.num_updates is I32


@pytest.mark.parametrize("flag,limit,name", [("fp8_e4m3fn", 448.0, "F8_E4M3"), ("fp8_e5m2", 57344.0, "F8_E5M2")])
def test_fp8_clamps_and_reports(tmp_path, capsys, flag, limit, name):
    x = torch.tensor([0.5, 1e6, -1e6, 300.0, float("inf")])
    save_tensors(tmp_path / "a.safetensors", {"w": x, "n": torch.tensor([7], dtype=torch.int32)})
    assert run("convert", tmp_path / "a.safetensors", tmp_path / "o.safetensors", "--dtype", flag, "--json") == 0
    report = json.loads(capsys.readouterr().out)
    over = int((x.abs() > limit).sum())
    assert report["clamped"]["elements"] == over
    out = open_file(tmp_path / "o.safetensors")
    assert out.spec("w").dtype == name and out.spec("n").dtype == "I32"
    y = out.get("w").float()
    assert torch.isfinite(y).all() and float(y.abs().max()) == limit


def test_lora_alpha_dtype_rule(tmp_path):
    t = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.randn(4, 5),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.randn(5, 4),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha": torch.tensor(0.1),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k.lora_down.weight": torch.randn(4, 5),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k.lora_up.weight": torch.randn(5, 4),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k.alpha": torch.tensor(2.0),
    }
    save_tensors(tmp_path / "l.safetensors", t)
    assert run("convert", tmp_path / "l.safetensors", tmp_path / "h.safetensors", "--dtype", "fp16") == 0
    out = open_file(tmp_path / "h.safetensors")
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha"
    k = q.replace("to_q", "to_k")
    assert out.spec(q).dtype == "F32" and float(out.get(q)) == float(t[q])  # 0.1 is not exact in fp16
    assert out.spec(k).dtype == "F16" and float(out.get(k)) == 2.0


# ----------------------------------------------------------------------------- prune


def test_prune_drops_exactly_the_documented_keys(tmp_path, capsys):
    ckpt = make_checkpoint("sd1", seed=3)
    extra = {
        "model_ema.diffusion_modelinput_blocks00weight": torch.randn(5, 4, 3, 3),
        "model_ema.diffusion_modelout2bias": torch.randn(4),
        "first_stage_model.loss.discriminator.main.0.weight": torch.randn(2, 3, 4, 4),
        "first_stage_model.loss.logvar": torch.zeros(()),
    }
    save_tensors(tmp_path / "full.safetensors", {**ckpt, **extra})
    assert run("convert", tmp_path / "full.safetensors", tmp_path / "pruned.safetensors", "--prune", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    kept = set(open_file(tmp_path / "pruned.safetensors").keys())
    documented = {k for k in {**ckpt, **extra} if any(k.startswith(p) for p, _ in PRUNE_RULES)}
    assert documented == set(extra) | {"model_ema.decay", "model_ema.num_updates"}
    assert kept == (set(ckpt) | set(extra)) - documented
    assert report["pruned"]["count"] == len(documented)
    assert all(prune_reason(k) is None for k in kept)
    assert "alphas_cumprod" in kept  # schedule buffers are kept (see docs/convert.md)


# ----------------------------------------------------------------------------- LoRA naming


@pytest.mark.parametrize("fixture,arch", [("sd15-lora-kohya", "sd1"), ("sd21-lora-kohya", "sd2")])
@pytest.mark.parametrize("via", ["peft", "diffusers"])
def test_kohya_roundtrip_preserves_delta(fixtures, tmp_path, fixture, arch, via):
    src = fixtures / f"{fixture}.safetensors"
    mid, back = tmp_path / f"{via}.safetensors", tmp_path / "back.safetensors"
    assert run("convert", src, mid, "--to", via) == 0
    assert run("convert", mid, back, "--to", "kohya") == 0
    d0 = deltas(src)
    assert_same_deltas(d0, deltas(mid))
    assert_same_deltas(d0, deltas(back))
    a, b = open_file(src), open_file(back)
    assert a.keys() == b.keys()
    assert all(a.spec(k) == b.spec(k) for k in a.keys())  # shapes (incl. SD2's 1x1-conv proj LoRA) and dtypes
    assert all(torch.equal(a.get(k), b.get(k)) for k in a.keys() if k.endswith((".alpha", "lora_down.weight")))


def test_alpha_survives_peft_to_diffusers_to_kohya(fixtures, tmp_path):
    src = fixtures / "sd15-lora-kohya.safetensors"  # alpha 2, rank 4
    assert run("convert", src, tmp_path / "p.safetensors", "--to", "peft") == 0
    assert run("convert", tmp_path / "p.safetensors", tmp_path / "d.safetensors", "--to", "diffusers") == 0
    assert run("convert", tmp_path / "d.safetensors", tmp_path / "k.safetensors", "--to", "kohya") == 0
    a, b = tensors_of(src), tensors_of(tmp_path / "k.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a if k.endswith(".alpha"))


def test_peft_names_match_the_reference_tables(fixtures, tmp_path):
    src = fixtures / "sd15-lora-kohya.safetensors"
    for naming in ("peft", "diffusers"):
        out = tmp_path / f"{naming}.safetensors"
        assert run("convert", src, out, "--to", naming) == 0
        got = open_file(out)
        reference = adapter_layout("sd1", f"lora-{naming}")
        assert set(reference) <= set(got.keys())
        for k, spec in reference.items():
            assert got.spec(k).shape == scaled_shape(spec.shape, 64), k


def test_sd2_fused_qkv_modules_are_separate_peft_modules(fixtures, tmp_path):
    mods = kohya_modules("sd2")
    q = mods["lora_te_text_model_encoder_layers_0_self_attn_q_proj"]
    k = mods["lora_te_text_model_encoder_layers_0_self_attn_k_proj"]
    v = mods["lora_te_text_model_encoder_layers_0_self_attn_v_proj"]
    assert q.address == k.address == v.address and [q.rows[0], k.rows[0], v.rows[0]] == [0, 1024, 2048]
    assert [m.peft_module.rsplit(".", 1)[1] for m in (q, k, v)] == ["q_proj", "k_proj", "v_proj"]
    out = tmp_path / "p.safetensors"
    assert run("convert", fixtures / "sd21-lora-kohya.safetensors", out, "--to", "peft") == 0
    keys = open_file(out).keys()
    for m in (q, k, v):
        assert f"{m.peft_module}.lora_A.weight" in keys
    proj = mods["lora_unet_down_blocks_0_attentions_0_proj_in"]
    assert proj.kind == "conv1x1" and len(proj.shape) == 2
    assert len(open_file(out).spec(f"{proj.peft_module}.lora_A.weight").shape) == 2  # squeezed: Linear in diffusers


def test_peft_to_kohya_to_peft_is_identity(fixtures, tmp_path):
    src = fixtures / "sd15-lora-peft.safetensors"
    assert run("convert", src, tmp_path / "k.safetensors", "--to", "kohya") == 0
    assert run("convert", tmp_path / "k.safetensors", tmp_path / "p.safetensors", "--to", "peft") == 0
    a, b = tensors_of(src), tensors_of(tmp_path / "p.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sdxl_kohya_to_peft(fixtures, tmp_path):
    src = fixtures / "sdxl-lora-kohya.safetensors"
    out = tmp_path / "p.safetensors"
    assert run("convert", src, out, "--to", "peft") == 0
    assert_same_deltas(deltas(src), deltas(out))
    got = open_file(out)
    reference = adapter_layout("sdxl", "lora-peft")  # kohya's LDM-path UNet names → diffusers module paths
    assert set(reference) <= set(got.keys())
    assert all(got.spec(k).shape == scaled_shape(spec.shape, 64) for k, spec in reference.items())


# ----------------------------------------------------------------------------- LyCORIS → LoRA


def _lycoris_file(path: Path, family: str) -> dict[str, torch.Tensor]:
    """A tiny LyCORIS file with real kohya names (shrink factor 64): one linear and one 3x3 conv module."""
    g = torch.Generator().manual_seed(7)
    mods = kohya_modules("sd1")
    lin = mods["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"]  # 640x640 → 10x10
    conv = mods["lora_unet_down_blocks_1_resnets_0_conv2"]  # 640x640x3x3 → 10x10x3x3
    t: dict[str, torch.Tensor] = {}
    for m in (lin, conv):
        out_f, in_f = scaled_shape(m.shape, 64)[:2]
        flat = in_f * (9 if m.kind == "conv3x3" else 1)
        if family == "loha":
            for w in ("w1", "w2"):
                t[f"{m.name}.hada_{w}_a"] = torch.randn(out_f, 2, generator=g)
                t[f"{m.name}.hada_{w}_b"] = torch.randn(2, flat, generator=g)
        else:
            t[f"{m.name}.lokr_w1"] = torch.randn(2, 2, generator=g)
            t[f"{m.name}.lokr_w2_a"] = torch.randn(out_f // 2, 2, generator=g)
            t[f"{m.name}.lokr_w2_b"] = torch.randn(2, flat // 2, generator=g)
        t[f"{m.name}.alpha"] = torch.tensor(1.0)
    save_tensors(path, t)
    return t


@pytest.mark.parametrize("family", ["loha", "lokr"])
def test_lycoris_to_lora_reproduces_delta(tmp_path, family, capsys):
    src = tmp_path / f"{family}.safetensors"
    _lycoris_file(src, family)
    out = tmp_path / "lora.safetensors"
    assert run("convert", src, out, "--to", "lora", "--arch", "sd1", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["families_in"] == [family] and report["max_rel_error"] < 1e-4
    keys = open_file(out).keys()
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)
    assert_same_deltas(deltas(src, "sd1"), deltas(out, "sd1"), rtol=1e-4)


@pytest.mark.parametrize("fixture", ["sd15-loha", "sd15-lokr", "sd15-locon-tucker"])  # Tucker LoHa: test_convert_math
def test_lycoris_fixtures_to_lora(fixtures, tmp_path, fixture):
    src, out = fixtures / f"{fixture}.safetensors", tmp_path / "lora.safetensors"
    assert run("convert", src, out, "--to", "lora") == 0
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in open_file(out).keys())
    if fixture in ("sd15-loha", "sd15-lokr"):  # refactored by SVD: the training record now names a plain LoRA
        meta = open_file(out).metadata
        assert meta["ss_network_module"] == "networks.lora" and "ss_network_args" not in meta
    d0, d1 = deltas(src), deltas(out)
    assert set(d0) == set(d1)
    for name in d0:  # fp16 factors: relative Frobenius error at fp16 resolution
        assert float((d0[name] - d1[name]).norm() / d0[name].norm()) < 2e-3, name


def test_dora_kept_for_kohya_refused_for_peft(fixtures, tmp_path, capsys):
    src = fixtures / "sd15-dora.safetensors"
    assert run("convert", src, tmp_path / "k.safetensors", "--to", "kohya") == 0
    a, b = tensors_of(src), tensors_of(tmp_path / "k.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if k.endswith("dora_scale"))
    assert run("convert", src, tmp_path / "p.safetensors", "--to", "peft") == 2
    assert "DoRA" in capsys.readouterr().err


def test_lycoris_max_error_refuses(tmp_path, capsys):
    src = tmp_path / "loha.safetensors"
    _lycoris_file(src, "loha")
    out = tmp_path / "lora.safetensors"
    assert run("convert", src, out, "--to", "lora", "--arch", "sd1", "--max-rank", "1", "--max-error", "0.001") == 2
    assert "max-error" in capsys.readouterr().err and not out.exists()


# ----------------------------------------------------------------------------- errors


def test_unmappable_key_exits_2_listing_it(fixtures, tmp_path, capsys):
    t = tensors_of(fixtures / "sd15-lora-kohya.safetensors")
    t["lora_unet_no_such_module.lora_down.weight"] = torch.zeros(4, 5)
    save_tensors(tmp_path / "bad.safetensors", t)
    assert run("convert", tmp_path / "bad.safetensors", tmp_path / "o.safetensors", "--to", "peft") == 2
    assert "lora_unet_no_such_module.lora_down.weight" in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()


def test_incomplete_module_exits_2_listing_it(fixtures, tmp_path, capsys):
    t = tensors_of(fixtures / "sd15-lora-kohya.safetensors")
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    del t[f"{name}.lora_up.weight"]
    save_tensors(tmp_path / "bad.safetensors", t)
    assert run("convert", tmp_path / "bad.safetensors", tmp_path / "o.safetensors", "--to", "peft") == 2
    assert name in capsys.readouterr().err


def test_existing_output_untouched_without_force(fixtures, tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"keep me")
    assert run("convert", fixtures / "sd15-lora-kohya.safetensors", out, "--to", "peft") == 2
    assert out.read_bytes() == b"keep me" and "--force" in capsys.readouterr().err
    assert run("convert", fixtures / "sd15-lora-kohya.safetensors", out, "--to", "peft", "--force") == 0
    assert out.read_bytes() != b"keep me"


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_malicious_ckpt_refused_nothing_executed(tmp_path, capsys):
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    pickle.dump({"state_dict": {"w": _Evil(str(marker))}}, buf, protocol=2)
    with zipfile.ZipFile(tmp_path / "evil.ckpt", "w") as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/version", "3\n")
    assert run("convert", tmp_path / "evil.ckpt", tmp_path / "o.safetensors") == 2
    assert "allow-list" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "o.safetensors").exists()


def test_wrong_target_for_kind(fixtures, tmp_path):
    assert run("convert", fixtures / "sd15-lora-kohya.safetensors", tmp_path / "a.safetensors", "--to", "ldm") == 2
    assert run("convert", fixtures / "sd15-tiny.safetensors", tmp_path / "b.safetensors", "--to", "peft") == 2
    assert run("convert", fixtures / "sd15-tiny.safetensors", tmp_path / "c.txt") == 2


def test_checkpoint_layout_roundtrip_through_convert(fixtures, tmp_path):
    src = fixtures / "sd15-tiny.safetensors"
    folder = tmp_path / "pipe"
    report = convert(open_file(src), folder, to="diffusers")
    assert (folder / "unet").is_dir() and report.to == "diffusers"
    assert run("convert", folder, tmp_path / "back.safetensors", "--to", "ldm") == 0
    a, b = open_file(src), open_file(tmp_path / "back.safetensors")
    common = set(b.keys())
    assert common <= set(a.keys()) and all(torch.equal(a.get(k), b.get(k)) for k in common)
