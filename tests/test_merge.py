"""`loratool merge` on the tiny fixtures: merged = base + Σ ratio·scale·ΔW, nothing else changes."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from support import reference, synth

from loratool.adapters import apply_to_weight, delta, load_adapter
from loratool.arch import kohya_modules
from loratool.blockweights import block_of, parse_block_weights
from loratool.cli import main
from loratool.errors import LoratoolError
from loratool.io.output import save_tensors
from loratool.io.source import open_file
from loratool.ops.merge import merge_tag_frequency, parse_adapter_arg

BASES = {"sd1": "sd15-tiny.safetensors", "sd2": "sd21-tiny.safetensors", "sdxl": "sdxl-tiny.safetensors"}


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def expected_merge(base: dict, adapters: list, te=1.0, unet=1.0) -> dict:
    """Recompute the merge in memory from the formula (module by module, fp32)."""
    out = {k: v.float().clone() for k, v in base.items()}
    for ad, ratio in adapters:
        for m in ad.modules.values():
            t = m.target
            r = ratio * (unet if t.component == "unet" else te)
            w = out[t.address]
            a, b = 0, w.shape[0]
            if t.rows is not None:
                f = t.shape[0] // w.shape[0]
                a, b = t.rows[0] // f, t.rows[1] // f
            # the formulas, written out independently of loratool (tests/support/reference.py)
            w[a:b] = reference.merged_weight(w[a:b], m.tensors, r).float()
    return out


def check_merge(fixtures, tmp_path, arch, adapter_files, ratios, extra=()):
    base_path = fixtures / BASES[arch]
    out = tmp_path / "out.safetensors"
    args = [f"{p}:{r}" for p, r in zip(adapter_files, ratios)]
    assert main(["merge", str(base_path), *args, "-o", str(out), *extra]) == 0
    base = load_file(base_path)
    merged = load_file(out)  # output loads back
    adapters = [(load_adapter(open_file(p)), r) for p, r in zip(adapter_files, ratios)]
    want = expected_merge(base, adapters)
    targeted = {m.target.address for ad, _ in adapters for m in ad.modules.values()}
    assert set(merged) == set(base)
    for k, v in base.items():
        assert merged[k].dtype == v.dtype
        if k in targeted:
            torch.testing.assert_close(merged[k].float(), want[k].to(v.dtype).float(), rtol=0, atol=2e-3)
            assert not torch.equal(merged[k], v), k
        else:
            assert raw(merged[k]) == raw(v), k  # byte for byte
    return out, targeted


@pytest.mark.parametrize(
    "name",
    ["sd15-lora-kohya", "sd15-lora-peft", "sd15-loha", "sd15-loha-tucker", "sd15-lokr", "sd15-locon-tucker", "sd15-dora"],
)
def test_every_family_into_sd1(fixtures, tmp_path, name):
    check_merge(fixtures, tmp_path, "sd1", [fixtures / f"{name}.safetensors"], [0.8])


def test_sd2_fused_qkv_and_1x1_conv_on_linear(fixtures, tmp_path):
    out, targeted = check_merge(fixtures, tmp_path, "sd2", [fixtures / "sd21-lora-kohya.safetensors"], [1.0])
    mods = kohya_modules("sd2")
    assert any(t.rows for t in mods.values())
    proj = mods["lora_unet_down_blocks_0_attentions_0_proj_in"]
    assert proj.kind == "conv1x1" and len(proj.shape) == 2 and proj.address in targeted


@pytest.mark.parametrize("arch", ["sd2", "sdxl"])
def test_lycoris_families_other_arches(fixtures, tmp_path, arch):
    # a few modules of each kind per family, written to temp files (in-memory generators, real names)
    mods = kohya_modules(arch)
    pick = {}
    for kind in ("linear", "conv1x1", "conv3x3"):
        pick.update(dict([kv for kv in mods.items() if kv[1].kind == kind][:3]))
    pick.update({n: t for n, t in mods.items() if t.rows and "layers_1_" in n})  # q/k/v slices of one layer
    files = []
    for i, tensors in enumerate(
        (
            synth.make_loha(arch, modules=pick, seed=11),
            synth.make_loha(arch, modules=pick, seed=12, tucker=True),
            synth.make_lokr(arch, modules=pick, seed=13),
            synth.make_locon_tucker(arch, modules=pick, seed=14),
            synth.make_dora(arch, modules=pick, seed=15),
        )
    ):
        p = tmp_path / f"a{i}.safetensors"
        save_tensors(p, tensors)
        files.append(p)
    check_merge(fixtures, tmp_path, arch, files, [0.5, -1.0, 1.5, 1.0, 0.7], extra=("--arch", arch))


def test_sdxl_two_adapters_negative_ratio(fixtures, tmp_path):
    check_merge(
        fixtures, tmp_path, "sdxl",
        [fixtures / "sdxl-lora-kohya.safetensors", fixtures / "sdxl-lora-peft.safetensors"], [0.6, -0.4],
    )  # fmt: skip


def test_deterministic_and_force(fixtures, tmp_path):
    base, lora = fixtures / "sd15-tiny.safetensors", fixtures / "sd15-lokr.safetensors"
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert main(["merge", str(base), f"{lora}:0.7", "-o", str(a)]) == 0
    assert main(["merge", str(base), f"{lora}:0.7", "-o", str(b)]) == 0
    assert a.read_bytes() == b.read_bytes()
    before = a.read_bytes()
    assert main(["merge", str(base), f"{lora}:0.3", "-o", str(a)]) == 2  # exists, no --force
    assert a.read_bytes() == before
    assert main(["merge", str(base), f"{lora}:0.3", "-o", str(a), "--force"]) == 0
    assert a.read_bytes() != before


def test_metadata_lineage(fixtures, tmp_path):
    out = tmp_path / "m.safetensors"
    assert main(["merge", str(fixtures / "sd15-tiny.safetensors"), str(fixtures / "sd15-lora-kohya.safetensors") + ":-0.5",
                 "-o", str(out), "--te-ratio", "0.5"]) == 0  # fmt: skip
    meta = safe_open(str(out), "pt").metadata()
    assert meta["loratool.synthetic"].startswith("sd1")  # base metadata kept
    recipe = json.loads(meta["loratool.merge.recipe"])
    assert recipe["base"] == "sd15-tiny.safetensors"
    assert recipe["adapters"] == [{"file": "sd15-lora-kohya.safetensors", "ratio": -0.5}]
    assert recipe["te_ratio"] == 0.5


def test_unmapped_is_error_exit_2(fixtures, tmp_path, capsys):
    tensors = load_file(fixtures / "sd15-lora-kohya.safetensors")
    tensors["lora_unet_no_such_block.lora_down.weight"] = torch.zeros(4, 5)
    tensors["lora_unet_no_such_block.lora_up.weight"] = torch.zeros(5, 4)
    bad = tmp_path / "bad.safetensors"
    save_tensors(bad, tensors)
    out = tmp_path / "o.safetensors"
    assert main(["merge", str(fixtures / "sd15-tiny.safetensors"), str(bad), "-o", str(out)]) == 2
    assert "lora_unet_no_such_block" in capsys.readouterr().err
    assert not out.exists()
    assert main(["merge", str(fixtures / "sd15-tiny.safetensors"), str(bad), "-o", str(out), "--allow-unmapped"]) == 0
    assert "lora_unet_no_such_block" in capsys.readouterr().out


def test_arch_mismatch_names_both(fixtures, tmp_path, capsys):
    rc = main(["merge", str(fixtures / "sd21-tiny.safetensors"), str(fixtures / "sd15-lora-kohya.safetensors"), "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2 and "SD1.x" in err and "SD2.x" in err


def test_dry_run_lists_rows_and_writes_nothing(fixtures, tmp_path, capsys):
    out = tmp_path / "never.safetensors"
    rc = main(["merge", str(fixtures / "sd21-tiny.safetensors"), str(fixtures / "sd21-lora-kohya.safetensors"),
               "-o", str(out), "--dry-run", "--json"])  # fmt: skip
    assert rc == 0 and not out.exists()
    data = json.loads(capsys.readouterr().out)
    rows = [a for a in data["assignments"] if a["rows"]]
    assert rows and all(a["key"].endswith("in_proj_weight") for a in rows)
    assert data["changed_keys"] == 370 and data["unmapped"] == []


def test_component_ratios(fixtures, tmp_path):
    base = load_file(fixtures / "sd15-tiny.safetensors")
    out = tmp_path / "o.safetensors"
    assert main(["merge", str(fixtures / "sd15-tiny.safetensors"), str(fixtures / "sd15-lora-kohya.safetensors"),
                 "-o", str(out), "--te-ratio", "0"]) == 0  # fmt: skip
    merged = load_file(out)
    te = [k for k in base if k.startswith("cond_stage_model.")]
    assert all(raw(merged[k]) == raw(base[k]) for k in te)
    assert not torch.equal(merged["model.diffusion_model.input_blocks.1.1.proj_in.weight"],
                           base["model.diffusion_model.input_blocks.1.1.proj_in.weight"])  # fmt: skip


def test_block_weights_mapping_and_effect(fixtures, tmp_path):
    mods = kohya_modules("sd1")
    assert block_of(mods["lora_unet_down_blocks_0_attentions_0_proj_in"]) == "IN01"
    assert block_of(mods["lora_unet_up_blocks_3_attentions_2_proj_out"]) == "OUT11"
    assert block_of(mods["lora_unet_mid_block_attentions_0_proj_in"]) == "M00"
    assert block_of(mods["lora_te_text_model_encoder_layers_0_mlp_fc1"]) == "BASE"
    assert block_of(kohya_modules("sdxl")["lora_unet_input_blocks_4_1_proj_in"]) == "IN04"
    bw = parse_block_weights("INALL", "sd1")
    assert bw.weight_for(mods["lora_unet_up_blocks_1_attentions_0_proj_in"]) == 0.0
    assert bw.weight_for(mods["lora_unet_down_blocks_1_attentions_0_proj_in"]) == 1.0
    with pytest.raises(LoratoolError):
        parse_block_weights("1,1,1", "sd1")
    with pytest.raises(LoratoolError):
        parse_block_weights("OUTALL", "sdxl")
    base = load_file(fixtures / "sd15-tiny.safetensors")
    out = tmp_path / "o.safetensors"
    assert main(["merge", str(fixtures / "sd15-tiny.safetensors"), str(fixtures / "sd15-lora-kohya.safetensors"),
                 "-o", str(out), "--lbw", "INALL"]) == 0  # fmt: skip
    merged = load_file(out)
    for k in base:
        changed = raw(merged[k]) != raw(base[k])
        if ".output_blocks." in k or ".middle_block." in k:
            assert not changed, k
    assert raw(merged["model.diffusion_model.input_blocks.1.1.proj_in.weight"]) != raw(
        base["model.diffusion_model.input_blocks.1.1.proj_in.weight"]
    )


def test_adapter_args(fixtures, tmp_path):
    p, r = parse_adapter_arg("<lora:sd15-lora-kohya:0.8>", fixtures)
    assert p == fixtures / "sd15-lora-kohya.safetensors" and r == 0.8
    odd = tmp_path / "my:lora.safetensors"
    shutil.copy(fixtures / "sd15-lora-kohya.safetensors", odd)
    assert parse_adapter_arg(str(odd)) == (odd, 1.0)
    assert parse_adapter_arg(f"{odd}:-0.25") == (odd, -0.25)
    with pytest.raises(LoratoolError, match="not a number"):
        parse_adapter_arg(f"{odd}:b:c")
    with pytest.raises(LoratoolError, match="no such file"):
        parse_adapter_arg(str(tmp_path / "missing.safetensors:0.5"))


# ----------------------------------------------------------------------------- LoRA + LoRA


def _two_loras(tmp_path):
    mods = kohya_modules("sd1")
    pick = {n: t for i, (n, t) in enumerate(mods.items()) if i % 7 == 0}  # every kind, 50 modules
    a = synth.make_lora("sd1", rank=4, alpha=1.0, seed=21, dtype="F32", modules=pick)
    b = synth.make_lora("sd1", rank=8, alpha=16.0, seed=22, dtype="F32", modules=pick)
    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_tensors(pa, a, {"ss_tag_frequency": json.dumps({"1_x": {"cat": 2, "dog": 1}}), "ss_resolution": "(512, 512)"})
    save_tensors(pb, b, {"ss_tag_frequency": json.dumps({"1_x": {"cat": 3}, "2_y": {"owl": 4}}), "ss_resolution": "(512, 512)"})
    return pa, pb


def _d(m) -> torch.Tensor:
    shape = (m.tensors["up"].shape[0], *m.tensors["down"].shape[1:])  # the shrunken weight's shape
    return delta(m, shape).double()


def _delta_sum(paths_ratios):
    total = {}
    for p, r in paths_ratios:
        for name, m in load_adapter(open_file(p)).modules.items():
            total[name] = total.get(name, 0) + r * _d(m)
    return total


def test_concat_is_exact_with_different_ranks_and_alphas(tmp_path):
    pa, pb = _two_loras(tmp_path)
    out = tmp_path / "c.safetensors"
    assert main(["merge", f"{pa}:0.7", f"{pb}:-1.3", "-o", str(out)]) == 0
    want = _delta_sum([(pa, 0.7), (pb, -1.3)])
    got = load_adapter(open_file(out))
    assert {m.tensors["down"].shape[0] for m in got.modules.values()} == {12}
    for name, m in got.modules.items():
        torch.testing.assert_close(_d(m), want[name], rtol=1e-5, atol=1e-6)
    meta = safe_open(str(out), "pt").metadata()
    assert json.loads(meta["ss_tag_frequency"]) == {"1_x": {"cat": 5, "dog": 1}, "2_y": {"owl": 4}}
    assert meta["ss_resolution"] == "(512, 512)" and len(meta["sshs_model_hash"]) == 64


def test_svd_error_reported_and_zero_at_full_rank(tmp_path, capsys):
    pa, pb = _two_loras(tmp_path)
    full, low = tmp_path / "full.safetensors", tmp_path / "low.safetensors"
    assert main(["merge", f"{pa}:0.7", f"{pb}:-1.3", "-o", str(full), "--mode", "svd", "--rank", "12", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["max_rel_error"] < 1e-5
    want = _delta_sum([(pa, 0.7), (pb, -1.3)])
    for name, m in load_adapter(open_file(full)).modules.items():
        torch.testing.assert_close(_d(m), want[name], rtol=1e-4, atol=1e-5)
    assert main(["merge", f"{pa}:0.7", f"{pb}:-1.3", "-o", str(low), "--mode", "svd", "--rank", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    errors = {m["name"]: m["rel_error"] for m in report["modules"]}
    for name, m in list(load_adapter(open_file(low)).modules.items())[:5]:
        actual = float((_d(m) - want[name]).norm() / want[name].norm())
        assert abs(actual - errors[name]) < 1e-4 and actual > 1e-3


@pytest.mark.parametrize("name", ["sd15-loha", "sd15-loha-tucker", "sd15-lokr", "sd15-locon-tucker"])
def test_lora_merge_converts_lycoris_parts(fixtures, tmp_path, capsys, name):
    # LoHa / LoKr / LoCon-Tucker parts are turned into LoRA factors (ops.convert.to_lora_factors);
    # the reported error is measured against the exact sum and is tiny
    pick = {n for i, n in enumerate(kohya_modules("sd1")) if i % 7 == 0}
    parts = []
    for src, seed, ratio in ((fixtures / "sd15-lora-kohya.safetensors", 0, 0.5), (fixtures / f"{name}.safetensors", 1, -0.8)):
        tensors = {k: v.float() for k, v in load_file(src).items() if k.split(".")[0] in pick}
        p = tmp_path / f"{seed}.safetensors"
        save_tensors(p, tensors)
        parts.append((p, ratio))
    out = tmp_path / "o.safetensors"
    assert main(["merge", *(f"{p}:{r}" for p, r in parts), "-o", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["max_rel_error"] < 1e-5
    got = load_adapter(open_file(out))
    srcs = [(load_adapter(open_file(p)), r) for p, r in parts]
    for mod_name, m in got.modules.items():
        shape = (m.tensors["up"].shape[0], *m.tensors["down"].shape[1:])
        want = sum(r * delta(ad.modules[mod_name], shape).double() for ad, r in srcs if mod_name in ad.modules)
        torch.testing.assert_close(_d(m), want, rtol=1e-4, atol=1e-5)


def test_lora_merge_refuses_dora(fixtures, tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    args = [str(fixtures / "sd15-lora-kohya.safetensors"), str(fixtures / "sd15-dora.safetensors"), "-o", str(out)]
    assert main(["merge", *args]) == 2
    assert "DoRA" in capsys.readouterr().err and not out.exists()


def test_merge_tag_frequency_sums():
    metas = [{"ss_tag_frequency": '{"a": {"x": 1}}'}, {"ss_tag_frequency": '{"a": {"x": 2, "y": 1}}'}, {}]
    assert merge_tag_frequency(metas) == {"a": {"x": 3, "y": 1}}


# ----------------------------------------------------------------------------- diffusers folder base


def _diffusers_folder(root, arch):
    specs = synth.checkpoint_specs(arch, "diffusers")
    by_comp = {}
    for k, spec in specs.items():
        comp, name = k.split("/", 1)
        by_comp.setdefault(comp, {})[name] = synth.random_tensor(k, spec, seed=3)
    for comp, tensors in by_comp.items():
        (root / comp).mkdir(parents=True)
        fname = "diffusion_pytorch_model.safetensors" if comp in ("unet", "vae") else "model.safetensors"
        save_tensors(root / comp / fname, tensors)
        (root / comp / "config.json").write_text("{}")
    (root / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    return root


@pytest.mark.parametrize("arch, lora", [("sd1", "sd15-lora-kohya"), ("sd2", "sd21-lora-kohya")])
def test_diffusers_folder_base(fixtures, tmp_path, arch, lora):
    base = _diffusers_folder(tmp_path / "base", arch)
    out = tmp_path / "merged"
    assert main(["merge", str(base), f"{fixtures / lora}.safetensors:0.9", "-o", str(out)]) == 0
    assert (out / "model_index.json").read_text() == (base / "model_index.json").read_text()
    assert (out / "unet" / "config.json").exists()
    src, got = open_file(base), open_file(out)
    assert set(src.keys()) == set(got.keys())
    ad = load_adapter(open_file(f"{fixtures / lora}.safetensors"))
    targeted = {m.target.diffusers_key: m for m in ad.modules.values()}
    assert len(targeted) == len(ad.modules)  # diffusers keeps q/k/v unfused: one weight per module
    for k in src.keys():
        if k in targeted:
            want = apply_to_weight(src.get(k).float(), targeted[k], 0.9).to(torch.float16)
            torch.testing.assert_close(got.get(k), want, rtol=0, atol=2e-3)
        else:
            assert raw(got.get(k)) == raw(src.get(k)), k


def test_ckpt_base_gives_same_tensors(fixtures, tmp_path):
    base = load_file(fixtures / "sd15-tiny.safetensors")
    torch.save({"state_dict": base, "global_step": 5}, tmp_path / "base.ckpt")
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    lora = str(fixtures / "sd15-lokr.safetensors")
    assert main(["merge", str(tmp_path / "base.ckpt"), lora, "-o", str(a)]) == 0
    assert main(["merge", str(fixtures / "sd15-tiny.safetensors"), lora, "-o", str(b)]) == 0
    ta, tb = load_file(a), load_file(b)
    assert set(ta) == set(tb) and all(raw(ta[k]) == raw(tb[k]) for k in ta)


def test_lora_merge_component_ratio_and_unmapped(tmp_path, capsys):
    pa, pb = _two_loras(tmp_path)
    out = tmp_path / "u.safetensors"
    assert main(["merge", f"{pa}:0.7", f"{pb}:-1.3", "-o", str(out), "--te-ratio", "0", "--unet-ratio", "2"]) == 0
    got = load_adapter(open_file(out))
    assert got.modules and all(m.target.component == "unet" for m in got.modules.values())
    want = _delta_sum([(pa, 1.4), (pb, -2.6)])
    for name, m in got.modules.items():
        torch.testing.assert_close(_d(m), want[name], rtol=1e-5, atol=1e-6)
    tensors = load_file(pa)
    tensors["lora_unet_nowhere.lora_down.weight"] = torch.zeros(4, 5)
    tensors["lora_unet_nowhere.lora_up.weight"] = torch.zeros(5, 4)
    save_tensors(pa, tensors, force=True)
    capsys.readouterr()
    assert main(["merge", str(pa), str(pb), "-o", str(tmp_path / "v.safetensors")]) == 2
    assert "lora_unet_nowhere" in capsys.readouterr().err


def test_output_dtype(fixtures, tmp_path):
    out = tmp_path / "bf.safetensors"
    assert main(["merge", str(fixtures / "sd15-tiny.safetensors"), str(fixtures / "sd15-lokr.safetensors"),
                 "-o", str(out), "--dtype", "bf16"]) == 0  # fmt: skip
    base, got = open_file(fixtures / "sd15-tiny.safetensors"), open_file(out)
    for k in base.keys():
        want = "BF16" if base.spec(k).dtype.startswith("F") else base.spec(k).dtype
        assert got.spec(k).dtype == want and got.spec(k).shape == base.spec(k).shape, k


def test_peft_dora_magnitude_vector_end_to_end(fixtures, tmp_path):
    # PEFT DoRA: lora_A/lora_B (no alpha ⇒ scale 1) plus lora_magnitude_vector (out,): W' = m · V / ‖V‖_row
    lora = load_file(fixtures / "sd15-lora-peft.safetensors")
    base = load_file(fixtures / "sd15-tiny.safetensors")
    mods = [t for t in kohya_modules("sd1").values() if t.component == "unet" and t.kind == "linear"][:6]
    tensors = {}
    for t in mods:
        a, b = lora[f"{t.peft_module}.lora_A.weight"].float(), lora[f"{t.peft_module}.lora_B.weight"].float()
        tensors[f"{t.peft_module}.lora_A.weight"], tensors[f"{t.peft_module}.lora_B.weight"] = a, b
        tensors[f"{t.peft_module}.lora_magnitude_vector"] = torch.linspace(0.5, 1.5, b.shape[0])
    p = tmp_path / "dora-peft.safetensors"
    save_tensors(p, tensors)
    out = tmp_path / "o.safetensors"
    assert main(["merge", str(fixtures / "sd15-tiny.safetensors"), str(p), "-o", str(out)]) == 0
    merged = load_file(out)
    for t in mods:
        w = base[t.address].float()
        v = w + tensors[f"{t.peft_module}.lora_B.weight"] @ tensors[f"{t.peft_module}.lora_A.weight"]
        want = tensors[f"{t.peft_module}.lora_magnitude_vector"][:, None] * v / v.norm(dim=1, keepdim=True)
        torch.testing.assert_close(merged[t.address].float(), want.half().float(), rtol=0, atol=2e-3)
        assert torch.allclose(merged[t.address].float().norm(dim=1), tensors[f"{t.peft_module}.lora_magnitude_vector"], atol=1e-2)


def test_full_diff_with_bias(fixtures, tmp_path):
    # LyCORIS "full" modules: diff (the whole ΔW, scale 1) and diff_b (the bias ΔW, next to the weight)
    base = load_file(fixtures / "sd15-tiny.safetensors")
    mods = [t for t in kohya_modules("sd1").values() if t.kind in ("linear", "conv3x3")][::60]
    tensors = {}
    for i, t in enumerate(mods):
        w, b = base[t.address], base[t.address.removesuffix("weight") + "bias"]
        tensors[f"{t.name}.diff"] = torch.full(w.shape, 0.01 * (i + 1))
        tensors[f"{t.name}.diff_b"] = torch.full(b.shape, -0.02)
    p = tmp_path / "full.safetensors"
    save_tensors(p, tensors)
    out = tmp_path / "o.safetensors"
    assert main(["merge", str(fixtures / "sd15-tiny.safetensors"), f"{p}:0.5", "-o", str(out)]) == 0
    merged = load_file(out)
    for i, t in enumerate(mods):
        bias = t.address.removesuffix("weight") + "bias"
        torch.testing.assert_close(merged[t.address].float(), (base[t.address].float() + 0.005 * (i + 1)).half().float())
        torch.testing.assert_close(merged[bias].float(), (base[bias].float() - 0.01).half().float())


# ----------------------------------------------------------------------------- properties

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from loratool.adapters import AdapterModule, LoadedAdapter  # noqa: E402
from loratool.ops.merge import merge_adapters  # noqa: E402


@settings(max_examples=20, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 5), st.floats(0.25, 64), st.floats(-3, 3).filter(lambda x: abs(x) > 1e-3)),
        min_size=1, max_size=3,
    ),
    st.sampled_from(["lora_te_text_model_encoder_layers_0_mlp_fc1", "lora_unet_down_blocks_0_resnets_0_conv1"]),
)  # fmt: skip
def test_concat_property_any_ranks_alphas_ratios(parts, name):
    import tempfile

    target = kohya_modules("sd1")[name]
    out_f, in_f = target.shape[0] // 64, target.shape[1] // 64
    kernel = tuple(target.shape[2:])
    adapters, want = [], 0
    for i, (r, alpha, ratio) in enumerate(parts):
        g = torch.Generator().manual_seed(i)
        down = torch.randn(r, in_f, *kernel, generator=g, dtype=torch.float64)
        up = torch.randn(out_f, r, *([1, 1] if kernel else []), generator=g, dtype=torch.float64)
        m = AdapterModule(target, "lora", {"down": down, "up": up, "alpha": torch.tensor(alpha)})
        adapters.append((LoadedAdapter("sd1", "kohya", {name: m}, [], [], {}, f"p{i}"), ratio))
        want = want + ratio * (alpha / r) * (up.reshape(out_f, r) @ down.reshape(r, -1))
    with tempfile.TemporaryDirectory() as d:
        report = merge_adapters(adapters, f"{d}/o.safetensors", dtype="fp64")
        got = load_file(f"{d}/o.safetensors")
    r_out = sum(p[0] for p in parts)
    assert report.modules[0].rank == r_out and float(got[f"{name}.alpha"]) == r_out
    up, down = got[f"{name}.lora_up.weight"], got[f"{name}.lora_down.weight"]
    # computed in float32 (as every merge is), stored in float64
    got_delta = up.reshape(out_f, r_out) @ down.reshape(r_out, -1)
    assert float((got_delta - want).norm() / want.norm()) < 1e-6


def test_sdxl_12_slot_block_weights(fixtures, tmp_path):
    base = load_file(fixtures / "sdxl-tiny.safetensors")
    out = tmp_path / "xl.safetensors"
    # BASE, IN04, IN05, IN07, IN08, M00 on; OUT00..OUT05 off
    assert main(["merge", str(fixtures / "sdxl-tiny.safetensors"), str(fixtures / "sdxl-lora-kohya.safetensors"),
                 "-o", str(out), "--lbw", "1,1,1,1,1,1,0,0,0,0,0,0"]) == 0  # fmt: skip
    merged = load_file(out)
    changed = {k for k in base if raw(merged[k]) != raw(base[k])}
    assert not any(".output_blocks." in k for k in changed)
    assert any(".input_blocks.4." in k for k in changed) and any(".middle_block." in k for k in changed)
    assert any(k.startswith("conditioner.embedders.1.") for k in changed)  # BASE covers both text encoders
