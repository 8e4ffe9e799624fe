"""`loratool resize`: lossless at full rank, equal to the truncated dense SVD, kohya metadata, clear refusals."""

from __future__ import annotations

import json

import pytest
import torch
from support.synth import make_lora, sized

from loratool.adapters import delta, load_adapter
from loratool.arch import kohya_modules
from loratool.cli import main
from loratool.errors import DetectionError, LoratoolError
from loratool.io.output import save_tensors
from loratool.io.source import open_file
from loratool.metadata import kohya_hashes
from loratool.ops.lowrank import SvFro, parse_rule
from loratool.ops.resize import resize_lora


def flat_delta(module) -> torch.Tensor:
    """Scaled ΔW of a (possibly shrunken) module, flattened to (out, in·kh·kw)."""
    t = module.tensors
    shape = (t["up"].shape[0], *t["down"].shape[1:])
    return delta(module, shape).reshape(shape[0], -1)


def load(path):
    with open_file(path) as src:
        return load_adapter(src)


@pytest.mark.parametrize("name", ["sd15-lora-kohya", "sd21-lora-kohya", "sdxl-lora-kohya", "sd15-lora-peft"])
def test_full_rank_resize_is_lossless(fixtures, tmp_path, name):
    src = fixtures / f"{name}.safetensors"
    out = tmp_path / "out.safetensors"
    result = resize_lora(src, out, rank=4, dtype="F32")
    a, b = load(src), load(out)
    assert b.unmapped == [] and set(b.modules) == set(a.modules) and b.arch == a.arch
    assert all(k.startswith("lora_") for k in open_file(out).keys())  # kohya names out, whatever came in
    for n, m in a.modules.items():
        torch.testing.assert_close(flat_delta(b.modules[n]), flat_delta(m), atol=1e-6, rtol=1e-5)
    assert result.average_retained == pytest.approx(1.0)
    assert {s.rank for s in result.modules} == {4}


def test_resize_equals_truncated_dense_svd(fixtures, tmp_path):
    src = fixtures / "sd15-lora-kohya.safetensors"
    out = tmp_path / "r2.safetensors"
    result = resize_lora(src, out, rank=2, dtype="F32")
    a, b = load(src), load(out)
    names = [n for n in sorted(a.modules) if "conv" in n][:3] + [n for n in sorted(a.modules) if "to_q" in n][:3]
    stats = {s.name: s for s in result.modules}
    for n in names:
        dense = flat_delta(a.modules[n]).double()
        u, s, vh = torch.linalg.svd(dense, full_matrices=False)
        best = u[:, :2] @ torch.diag(s[:2]) @ vh[:2]
        got = flat_delta(b.modules[n]).double()
        torch.testing.assert_close(torch.linalg.svdvals(got)[:2], s[:2], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got, best, atol=1e-6, rtol=1e-4)
        assert stats[n].retained == pytest.approx(float(s[:2].norm() / s.norm()), rel=1e-5)
        assert stats[n].rank_in == 4 and stats[n].rank == 2
    # alpha/rank convention kept: input alpha 2 at rank 4 → scale 0.5 → alpha 1 at rank 2
    assert float(b.modules[names[0]].tensors["alpha"]) == pytest.approx(1.0)


def test_metadata_and_hashes(fixtures, tmp_path):
    out = tmp_path / "r.safetensors"
    resize_lora(fixtures / "sd15-lora-kohya.safetensors", out, rank=3, rule=SvFro(0.8))
    src = open_file(out)
    meta = src.metadata
    assert meta["ss_network_dim"] == "Dynamic" and meta["ss_network_alpha"] == "Dynamic"
    record = json.loads(meta["loratool.resize"])
    assert record["rule"] == "sv_fro:0.8" and record["ranks_in"] == "4"
    tensors = {k: src.get(k) for k in src.keys()}
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == kohya_hashes(tensors, meta)
    assert src.spec("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight").dtype == "F16"  # input dtype kept


def test_fixed_rank_metadata_is_uniform(fixtures, tmp_path):
    out = tmp_path / "r.safetensors"
    resize_lora(fixtures / "sd15-lora-kohya.safetensors", out, rank=2, conv_rank=1)
    meta = open_file(out).metadata
    assert meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "1"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "1", "conv_alpha": "0.5"}
    mods = load(out).modules
    assert mods["lora_unet_down_blocks_0_resnets_0_conv1"].tensors["down"].shape[0] == 1
    assert mods["lora_unet_down_blocks_0_resnets_0_conv1"].tensors["down"].dim() == 4


def test_budget_rule_fits_the_size(fixtures, tmp_path):
    out = tmp_path / "r.safetensors"
    budget_params = 40_000
    result = resize_lora(fixtures / "sd15-lora-kohya.safetensors", out, rank=4, rule=parse_rule(f"params:{budget_params}"))
    src = open_file(out)
    factor_params = sum(src.spec(k).numel for k in src.keys() if not k.endswith(".alpha"))
    assert factor_params <= budget_params
    ranks = {s.rank for s in result.modules}
    assert len(ranks) > 1  # the budget is spread unevenly


def _one_module(tmp_path, name, extra):
    target = next(t for t in kohya_modules("sd1").values() if t.kind == "linear" and t.component == "unet")
    out_f, in_f = sized(target, "sd1", 64).target_shape
    g = torch.Generator().manual_seed(0)
    tensors = {f"{target.name}.{k}": torch.randn(*s(out_f, in_f), generator=g) for k, s in extra.items()}
    tensors[f"{target.name}.alpha"] = torch.tensor(2.0)
    return target, save_tensors(tmp_path / name, tensors)


def test_loha_goes_through_convert_and_keeps_delta(tmp_path):
    roles = {
        "hada_w1_a": lambda o, i: (o, 2),
        "hada_w1_b": lambda o, i: (2, i),
        "hada_w2_a": lambda o, i: (o, 2),
        "hada_w2_b": lambda o, i: (2, i),
    }
    target, src = _one_module(tmp_path, "loha.safetensors", roles)
    out = tmp_path / "out.safetensors"
    result = resize_lora(src, out, rank=4, arch="sd1", dtype="F32")  # LoHa rank ≤ 2·2
    with open_file(src) as s1, open_file(out) as s2:
        a, b = load_adapter(s1, "sd1").modules[target.name], load_adapter(s2, "sd1").modules[target.name]
    shape = tuple(b.tensors["up"].shape[:1]) + tuple(b.tensors["down"].shape[1:])
    torch.testing.assert_close(delta(b, shape), delta(a, shape), atol=1e-5, rtol=1e-4)
    assert b.family == "lora" and result.modules[0].retained == pytest.approx(1.0)


def test_dora_is_refused_with_a_clear_error(tmp_path):
    roles = {
        "lora_down.weight": lambda o, i: (2, i),
        "lora_up.weight": lambda o, i: (o, 2),
        "dora_scale": lambda o, i: (1, i),
    }
    _, src = _one_module(tmp_path, "dora.safetensors", roles)
    with pytest.raises(DetectionError) as info:
        resize_lora(src, tmp_path / "out.safetensors", rank=1, arch="sd1")
    assert "DoRA" in info.value.message and "extract" in info.value.hint
    assert main(["resize", str(src), "-o", str(tmp_path / "o.safetensors"), "--rank", "1", "--arch", "sd1"]) == 2


def test_conv_tucker_mid_is_folded(tmp_path):
    target = next(t for t in kohya_modules("sd1").values() if t.kind == "conv3x3")
    out_f, in_f = sized(target, "sd1", 64).target_shape[:2]
    g = torch.Generator().manual_seed(0)
    tensors = {
        f"{target.name}.lora_down.weight": torch.randn(3, in_f, 1, 1, generator=g),
        f"{target.name}.lora_mid.weight": torch.randn(3, 3, 3, 3, generator=g),
        f"{target.name}.lora_up.weight": torch.randn(out_f, 3, 1, 1, generator=g),
        f"{target.name}.alpha": torch.tensor(3.0),
    }
    src = save_tensors(tmp_path / "locon.safetensors", tensors)
    out = tmp_path / "out.safetensors"
    resize_lora(src, out, rank=3, arch="sd1", dtype="F32")
    with open_file(src) as s1, open_file(out) as s2:
        a, b = load_adapter(s1, "sd1").modules[target.name], load_adapter(s2, "sd1").modules[target.name]
    shape = (out_f, in_f, 3, 3)
    torch.testing.assert_close(delta(b, shape), delta(a, shape), atol=1e-5, rtol=1e-5)
    assert "mid" not in b.tensors and tuple(b.tensors["down"].shape) == (3, in_f, 3, 3)


def test_cli_resize_json_and_errors(fixtures, tmp_path, capsys):
    src = fixtures / "sdxl-lora-peft.safetensors"
    out = tmp_path / "r.safetensors"
    assert main(["resize", str(src), "-o", str(out), "--rank", "2", "--rule", "sv_ratio:2", "--json", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["arch"] == "sdxl" and report["input_naming"] == "peft" and report["rule"] == "sv_ratio:2"
    assert all(1 <= m["rank"] <= 2 for m in report["modules"])
    assert main(["resize", str(src), "-o", str(out), "--rank", "2"]) == 2  # exists without --force
    assert main(["resize", str(src), "-o", str(tmp_path / "x.safetensors"), "--rank", "0"]) == 2
    assert main(["resize", str(src), "-o", str(tmp_path / "x.safetensors"), "--rank", "2", "--rule", "sv_fro:2"]) == 2
    assert main(["resize", str(src), "-o", str(src), "--rank", "2", "--force"]) == 2  # never overwrite the input
    if not torch.cuda.is_available():
        assert main(["resize", str(src), "-o", str(tmp_path / "x.safetensors"), "--rank", "2", "--device", "cuda"]) == 2


def test_rank_must_be_positive(fixtures, tmp_path):
    with pytest.raises(LoratoolError):
        resize_lora(fixtures / "sd15-lora-kohya.safetensors", tmp_path / "x.safetensors", rank=2, conv_rank=0)


def test_peft_sd2_proj_becomes_kohya_1x1_conv(tmp_path):
    tensors = make_lora("sd2", rank=2, naming="peft", seed=5, dtype="F32")
    src = save_tensors(tmp_path / "peft.safetensors", tensors)
    out = tmp_path / "k.safetensors"
    resize_lora(src, out, rank=2, arch="sd2", dtype="F32")
    spec = open_file(out).spec("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight")
    assert len(spec.shape) == 4 and spec.shape[2:] == (1, 1)  # kohya builds SD2 proj as 1x1 conv
    a, b = load(src), load(out)
    for n in a.modules:
        torch.testing.assert_close(flat_delta(b.modules[n]), flat_delta(a.modules[n]), atol=1e-6, rtol=1e-5)


def test_diffusers_named_input(tmp_path):
    src = save_tensors(tmp_path / "d.safetensors", make_lora("sd1", rank=3, naming="diffusers", seed=9, dtype="F32"))
    out = tmp_path / "k.safetensors"
    resize_lora(src, out, rank=3, dtype="F32")
    a, b = load(src), load(out)
    assert a.naming == "diffusers" and b.naming == "kohya" and b.unmapped == []
    for n in a.modules:
        torch.testing.assert_close(flat_delta(b.modules[n]), flat_delta(a.modules[n]), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["sd15-lokr", "sd15-loha-tucker", "sd15-locon-tucker"])
def test_lycoris_fixtures_resize_without_loss_at_high_rank(fixtures, tmp_path, name):
    src = fixtures / f"{name}.safetensors"
    if not src.exists():
        pytest.skip(f"{name} fixture not present")
    out = tmp_path / "r.safetensors"
    resize_lora(src, out, rank=64, dtype="F32")
    a, b = load(src), load(out)
    assert set(a.modules) == set(b.modules) and b.unmapped == []
    for n, m in a.modules.items():
        t = b.modules[n].tensors
        shape = (t["up"].shape[0], *t["down"].shape[1:])
        want = delta(m, shape).reshape(shape[0], -1)
        torch.testing.assert_close(flat_delta(b.modules[n]), want, atol=1e-5, rtol=1e-4)
