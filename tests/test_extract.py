"""`loratool extract`: recovers a planted low-rank ΔW, randomized ≈ exact, kohya output, clear refusals."""

from __future__ import annotations

import json

import pytest
import torch
from support.synth import make_checkpoint, sized

from loratool.adapters import delta, load_adapter
from loratool.arch import kohya_modules
from loratool.cli import main
from loratool.errors import MappingError
from loratool.io.output import save_tensors
from loratool.io.source import open_file
from loratool.metadata import kohya_hashes
from loratool.ops.extract import extract_lora
from loratool.ops.lowrank import parse_rule, randomized_svd, seed_for

RANK = 2


def flat_delta(module) -> torch.Tensor:
    t = module.tensors
    shape = (t["up"].shape[0], *t["down"].shape[1:])
    return delta(module, shape).reshape(shape[0], -1)


def plant(arch: str, components=("unet",), conv: bool = False, seed: int = 0):
    """(base, tuned, planted): tuned = base + a rank-2 UV on every selected module."""
    base = make_checkpoint(arch, seed=1, dtype="F32")
    tuned = dict(base)
    g = torch.Generator().manual_seed(seed)
    planted = {}
    for t in kohya_modules(arch).values():
        if t.component not in components or (t.kind == "conv3x3" and not conv):
            continue
        w = tuned[t.address].clone()
        t = sized(t, arch, 64)  # the fixtures' config (make_checkpoint's default)
        rows = w if t.rows is None else w[t.rows[0]: t.rows[1]]
        uv = 0.1 * torch.randn(rows.shape[0], RANK, generator=g) @ torch.randn(RANK, rows[0].numel(), generator=g)
        rows += uv.reshape(rows.shape)
        tuned[t.address] = w
        planted[t.name] = uv
    return base, tuned, planted


@pytest.fixture(scope="module")
def sd1_pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("sd1")
    base, tuned, planted = plant("sd1", conv=True)
    return save_tensors(d / "base.safetensors", base), save_tensors(d / "tuned.safetensors", tuned), planted


def _max_rel_error(out, planted) -> float:
    with open_file(out) as src:
        loaded = load_adapter(src)
    assert loaded.unmapped == [] and set(loaded.modules) == set(planted)
    return max(float((flat_delta(m) - planted[n]).norm() / planted[n].norm()) for n, m in loaded.modules.items())


@pytest.fixture(scope="module")
def exact_out(sd1_pair, tmp_path_factory):
    base, tuned, _ = sd1_pair
    out = tmp_path_factory.mktemp("exact") / "x.safetensors"
    return out, extract_lora(tuned, base, out, rank=RANK, conv_rank=RANK, exact=True, dtype="F32")


@pytest.fixture(scope="module")
def randomized_out(sd1_pair, tmp_path_factory):
    base, tuned, _ = sd1_pair
    out = tmp_path_factory.mktemp("rand") / "r.safetensors"
    # oversample 1 keeps the sketch (3 columns) below the shrunken matrices' sizes, so the randomized path runs
    return out, extract_lora(tuned, base, out, rank=RANK, conv_rank=RANK, oversample=1, n_iter=1)


def test_exact_extraction_recovers_planted_delta(sd1_pair, exact_out):
    _, _, planted = sd1_pair
    out, result = exact_out
    assert _max_rel_error(out, planted) < 1e-5
    assert result.text_encoder_unchanged and result.conv_skipped == 0
    assert len(result.skipped) == 72  # SD1.5 has 72 text-encoder modules, all unchanged


def test_randomized_within_one_percent_of_exact(sd1_pair, randomized_out):
    _, _, planted = sd1_pair
    out, result = randomized_out
    assert not result.exact
    assert _max_rel_error(out, planted) < 1e-2  # F16 output: the rounding dominates


def test_randomized_close_to_exact_on_full_rank_differences():
    base, tuned = make_checkpoint("sd1", seed=1, dtype="F32"), make_checkpoint("sd1", seed=2, dtype="F32")
    names = ["to_q", "ff_net_0_proj", "proj_in", "time_emb_proj", "conv1", "fc1"]
    targets = [next(t for t in kohya_modules("sd1").values() if t.name.endswith(n)) for n in names]
    for t in targets:
        d = (tuned[t.address] - base[t.address]).float()
        d = d.reshape(d.shape[0], -1)
        assert 2 + 2 < min(d.shape)  # the sketch is smaller than the matrix: no exact fallback
        u, s, vh = randomized_svd(d, 2, oversample=2, seed=seed_for(t.name))
        exact = torch.linalg.svdvals(d)
        best = float(exact[2:].norm())
        assert float((d - u @ torch.diag(s) @ vh).norm()) <= 1.01 * best + 1e-6


def test_no_conv_rank_leaves_3x3_convs_out(sd1_pair, tmp_path):
    base, tuned, planted = sd1_pair
    out = tmp_path / "x.safetensors"
    result = extract_lora(tuned, base, out, rank=RANK, exact=True)
    assert result.conv_skipped == sum(t.kind == "conv3x3" for t in kohya_modules("sd1").values())
    assert all(m.kind != "conv3x3" for m in result.modules)


def test_output_metadata_is_kohya(sd1_pair, tmp_path):
    base, tuned, _ = sd1_pair
    out = tmp_path / "x.safetensors"
    extract_lora(tuned, base, out, rank=RANK, conv_rank=1, exact=True)
    src = open_file(out)
    meta = src.metadata
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "2"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "1", "conv_alpha": "1"}
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    tensors = {k: src.get(k) for k in src.keys()}
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == kohya_hashes(tensors, meta)
    assert {src.spec(k).dtype for k in src.keys()} == {"F16"}
    assert float(tensors["lora_unet_down_blocks_0_attentions_0_proj_in.alpha"]) == 2.0


@pytest.mark.parametrize("arch", ["sd2", "sdxl"])
def test_other_arches_with_fused_qkv(tmp_path, arch):
    base, tuned, planted = plant(arch, components=("text_encoder", "text_encoder_2"))
    b = save_tensors(tmp_path / "b.safetensors", base)
    t = save_tensors(tmp_path / "t.safetensors", tuned)
    out = tmp_path / "x.safetensors"
    result = extract_lora(t, b, out, rank=RANK, exact=True, dtype="F32")
    assert result.arch == arch and not result.text_encoder_unchanged
    assert _max_rel_error(out, planted) < 1e-5
    if arch == "sd2":
        assert any("self_attn_k_proj" in n for n in planted)  # rows of the fused in_proj_weight


def test_dynamic_rule_finds_planted_rank(sd1_pair, tmp_path):
    base, tuned, _ = sd1_pair
    result = extract_lora(tuned, base, tmp_path / "x.safetensors", rank=8, rule=parse_rule("sv_fro:0.999"), exact=True)
    assert {m.rank for m in result.modules} <= {1, 2}


def test_clamp_quantile_bounds_factors(sd1_pair, tmp_path):
    base, tuned, _ = sd1_pair
    out = tmp_path / "x.safetensors"
    extract_lora(tuned, base, out, rank=RANK, clamp=0.5, dtype="F32", exact=True)
    src = open_file(out)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    up, down = src.get(f"{name}.lora_up.weight"), src.get(f"{name}.lora_down.weight")
    pooled = torch.cat([up.reshape(-1), down.reshape(-1)]).abs()
    assert float((pooled == pooled.max()).float().mean()) >= 0.4  # half the values sit at the clamp


def test_mismatched_files_fail(fixtures, tmp_path):
    with pytest.raises(MappingError):
        extract_lora(fixtures / "sd15-tiny.safetensors", fixtures / "sdxl-tiny.safetensors", tmp_path / "x.safetensors", rank=2)
    base = make_checkpoint("sd1", seed=1)
    key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    other = dict(base)
    other[key] = torch.zeros(7, 5, 1, 1, dtype=torch.float16)
    b = save_tensors(tmp_path / "b.safetensors", base)
    o = save_tensors(tmp_path / "o.safetensors", other)
    with pytest.raises(MappingError) as info:
        extract_lora(o, b, tmp_path / "x.safetensors", rank=2, arch="sd1")
    assert key in info.value.message
    assert main(["extract", str(o), str(b), "-o", str(tmp_path / "x.safetensors"), "--rank", "2", "--arch", "sd1"]) == 2


def test_identical_files_fail_and_cli_errors(fixtures, tmp_path):
    f = fixtures / "sd15-tiny.safetensors"
    out = str(tmp_path / "x.safetensors")
    assert main(["extract", str(f), str(f), "-o", out, "--rank", "2"]) == 2  # nothing differs
    assert main(["extract", str(f), str(f), "-o", out, "--rank", "0"]) == 2
    assert main(["extract", str(f), str(f), "-o", str(f), "--rank", "2", "--force"]) == 2


def test_cli_extract_json(sd1_pair, tmp_path, capsys):
    base, tuned, planted = sd1_pair
    out = tmp_path / "x.safetensors"
    code = main(["extract", str(tuned), str(base), "-o", str(out), "--rank", "2", "--exact", "--device", "cpu", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["svd"] == "exact" and report["text_encoder_unchanged"] is True
    expected = {n for n in planted if kohya_modules("sd1")[n].kind != "conv3x3"}
    assert {m["name"] for m in report["modules"]} == expected
    assert report["average_retained"] == pytest.approx(1.0, abs=1e-6)


def test_all_layers_covers_the_kohya_network_and_loads_back(sd1_pair, tmp_path):
    from loratool.arch.sd_naming import all_modules

    base, tuned, _ = sd1_pair
    out = tmp_path / "all.safetensors"
    plain = extract_lora(tuned, base, tmp_path / "plain.safetensors", rank=1, exact=True, min_diff=-1.0)
    wide = extract_lora(tuned, base, out, rank=1, exact=True, all_layers=True, min_diff=-1.0)
    names = {m.name for m in wide.modules}
    assert {m.name for m in plain.modules} <= names <= set(all_modules("sd1"))
    with open_file(out) as src:
        assert load_adapter(src).unmapped == []
