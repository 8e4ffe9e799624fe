"""FLUX.1 LoRA formats beyond kohya / PEFT: XLabs (x-flux) files, PEFT → kohya refusion of split parts, and
kohya ``split_qkv`` files written back; every expectation is written out from the factors."""

from __future__ import annotations

import pytest
import torch
from support.synth import FLUX_SMALL, iter_lora, split_qkv_lora, tiny_config, write_checkpoint

from loratool.arch.flux_naming import split_modules, xlabs_modules
from loratool.cli import main
from loratool.io.output import save_tensors
from loratool.io.source import open_file

H = FLUX_SMALL["hidden_size"]


def ref(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """ΔW of a linear LoRA written out: Σ_r up[o, r] · down[r, i]."""
    return torch.einsum("or,ri->oi", up.double(), down.double()).float()


def assert_holds_exactly(path, expected: dict[str, torch.Tensor]) -> None:
    """The file at ``path`` has exactly ``expected``'s keys, each tensor equal after a cast to its dtype."""
    with open_file(path) as f:
        assert set(f.keys()) == set(expected)
        for k, v in expected.items():
            assert torch.equal(f.get(k).to(v.dtype), v), k


def xlabs_lora(factor: int, rank: int, seed: int = 0, dtype=torch.float32, prefix: str = "") -> dict[str, torch.Tensor]:
    """An x-flux LoRA (every double- and single-block processor), sized to the config of ``factor``."""
    g = torch.Generator().manual_seed(seed)
    config = tiny_config("flux1", factor) if factor > 1 else None
    out = {}
    for name, target in xlabs_modules().items():
        t = target.sized(config) if config is not None else target
        rows, cols = t.target_shape
        out[f"{prefix}{name}.down.weight"] = (torch.randn(rank, cols, generator=g) * 0.1).to(dtype)
        out[f"{prefix}{name}.up.weight"] = (torch.randn(rows, rank, generator=g) * 0.1).to(dtype)
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("fluxfmt")
    write_checkpoint(d / "base.safetensors", "flux1", factor=64, dtype="F32")
    return d


def test_xlabs_targets_follow_x_flux():
    m = xlabs_modules()
    assert len(m) == 19 * 4 + 38 * 2
    assert m["double_blocks.4.processor.qkv_lora2"].name == "lora_unet_double_blocks_4_txt_attn_qkv"
    assert m["double_blocks.4.processor.proj_lora1"].name == "lora_unet_double_blocks_4_img_attn_proj"
    single = m["single_blocks.9.processor.qkv_lora"]
    assert (single.address, single.rows) == ("single_blocks.9.linear1.weight", (0, 9216))  # q, k, v; not the MLP
    assert m["single_blocks.9.processor.proj_lora"].name == "lora_unet_single_blocks_9_linear2"


@pytest.mark.parametrize("prefix", ["", "diffusion_model."])
def test_xlabs_merge_equals_the_formula(base, tmp_path, prefix, capsys):
    lora = xlabs_lora(64, rank=4, prefix=prefix)
    path = tmp_path / "xlabs.safetensors"
    save_tensors(path, lora)
    assert main(["inspect", "--json", str(path)]) == 0
    assert '"naming": "xlabs"' in capsys.readouterr().out
    out = tmp_path / "m.safetensors"
    assert main(["merge", str(base / "base.safetensors"), f"{path}:0.6", "-o", str(out)]) == 0
    p = prefix
    with open_file(base / "base.safetensors") as b, open_file(out) as m:
        # no alpha in an XLabs file: scale 1 (x-flux and diffusers apply up @ down as it is)
        for proc, key in (("qkv_lora1", "img_attn.qkv"), ("qkv_lora2", "txt_attn.qkv"), ("proj_lora2", "txt_attn.proj")):
            n = f"{p}double_blocks.5.processor.{proc}"
            want = b.get(f"double_blocks.5.{key}.weight") + 0.6 * ref(lora[f"{n}.up.weight"], lora[f"{n}.down.weight"])
            torch.testing.assert_close(m.get(f"double_blocks.5.{key}.weight"), want, rtol=1e-5, atol=1e-6)
        n = f"{p}single_blocks.8.processor.qkv_lora"
        want = b.get("single_blocks.8.linear1.weight").clone()
        want[: 3 * H] += 0.6 * ref(lora[f"{n}.up.weight"], lora[f"{n}.down.weight"])  # the MLP rows stay
        got = m.get("single_blocks.8.linear1.weight")
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert torch.equal(got[3 * H:], b.get("single_blocks.8.linear1.weight")[3 * H:])


def test_xlabs_converts_to_kohya_and_peft_exactly(base, tmp_path):
    lora = xlabs_lora(64, rank=3, seed=2)
    path = tmp_path / "xlabs.safetensors"
    save_tensors(path, lora)
    kohya, peft = tmp_path / "k.safetensors", tmp_path / "p.safetensors"
    assert main(["convert", str(path), str(kohya), "--to", "kohya"]) == 0
    assert main(["convert", str(path), str(peft), "--to", "peft"]) == 0
    n = "single_blocks.2.processor.qkv_lora"
    with open_file(kohya) as k:
        keys = set(k.keys())
        assert all(key.startswith("lora_unet_") for key in keys)
        up = k.get("lora_unet_single_blocks_2_linear1.lora_up.weight")
        assert up.shape == (7 * H, 3)  # the whole linear1, rank kept; the MLP rows are zero
        assert torch.equal(up[: 3 * H], lora[f"{n}.up.weight"]) and not up[3 * H:].any()
        assert torch.equal(k.get("lora_unet_single_blocks_2_linear1.lora_down.weight"), lora[f"{n}.down.weight"])
        assert float(k.get("lora_unet_single_blocks_2_linear1.alpha")) == 3.0  # alpha = rank: scale 1
    with open_file(peft) as p:
        assert "transformer.single_transformer_blocks.2.proj_mlp.lora_A.weight" not in set(p.keys())
        torch.testing.assert_close(p.get("transformer.single_transformer_blocks.2.attn.to_k.lora_B.weight"),
                                   lora[f"{n}.up.weight"][H: 2 * H])
    merged = {}
    for f in (path, kohya, peft):
        out = tmp_path / f"m-{f.stem}.safetensors"
        assert main(["merge", str(base / "base.safetensors"), f"{f}:0.9", "-o", str(out)]) == 0
        merged[f.stem] = out
    with open_file(merged["xlabs"]) as a, open_file(merged["k"]) as b, open_file(merged["p"]) as c:
        for key in a.keys():
            torch.testing.assert_close(b.get(key), a.get(key), rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(c.get(key), a.get(key), rtol=1e-6, atol=1e-7)


def test_diffusers_xlabs_converter_maps_every_module_where_our_tables_say(tmp_path):
    """diffusers' own XLabs → diffusers converter (real widths: a full-width rank-1 x-flux file, ~4 MB)
    puts every processor on the same diffusers modules and rows as our XLabs table."""
    pytest.importorskip("diffusers")
    from diffusers import FluxPipeline

    from loratool.adapters import delta, load_adapter
    from loratool.adapters.io import split_fused

    path = tmp_path / "xlabs-r1.safetensors"
    save_tensors(path, xlabs_lora(1, rank=1, dtype=torch.bfloat16))
    theirs = FluxPipeline.lora_state_dict(str(path))
    theirs = theirs[0] if isinstance(theirs, tuple) else theirs
    with open_file(path) as src:
        loaded = load_adapter(src)
        assert loaded.naming == "xlabs"
        ours = split_fused(loaded).modules
    by_peft = {m.target.peft_module: m for m in ours.values()}
    modules = {k.removesuffix(".lora_A.weight") for k in theirs if k.endswith(".lora_A.weight")}
    assert modules == set(by_peft)
    for name in sorted(modules)[::7]:
        a, b = theirs[f"{name}.lora_A.weight"].float(), theirs[f"{name}.lora_B.weight"].float()
        torch.testing.assert_close(b @ a, delta(by_peft[name]), rtol=2e-2, atol=1e-6)


def test_peft_to_kohya_fuses_the_parts_exactly(base, tmp_path):
    """Split PEFT parts with their own downs become one kohya module per fused tensor: downs stacked, up
    block-diagonal (rank 3·r for q/k/v, 4·r for linear1), alpha giving scale 1; merged, it equals the PEFT file."""
    peft = dict(iter_lora("flux1", rank=3, naming="peft", modules=split_modules(), dtype="F32",
                          components=("transformer",)))
    path = tmp_path / "peft.safetensors"
    save_tensors(path, peft)
    kohya = tmp_path / "k.safetensors"
    assert main(["convert", str(path), str(kohya), "--to", "kohya"]) == 0
    with open_file(kohya) as k:
        keys = set(k.keys())
        # every module takes its kohya (BFL) name, the embedders and final layer too (lora_unet_img_in...): a file
        # that mixed in kohya-style diffusers names (lora_transformer_...) would lose modules in diffusers' loader
        assert all(key.startswith("lora_unet_") for key in keys)
        assert "lora_unet_img_in.lora_down.weight" in keys and "lora_unet_final_layer_adaLN_modulation_1.alpha" in keys
        n = "lora_unet_single_blocks_4_linear1"
        down, up = k.get(f"{n}.lora_down.weight"), k.get(f"{n}.lora_up.weight")
        assert down.shape == (12, H) and up.shape == (7 * H, 12)
        assert float(k.get(f"{n}.alpha")) == 12.0
        p = "transformer.single_transformer_blocks.4"
        assert torch.equal(down[3:6], peft[f"{p}.attn.to_k.lora_A.weight"])
        assert torch.equal(up[H: 2 * H, 3:6], peft[f"{p}.attn.to_k.lora_B.weight"])
        assert not up[H: 2 * H, :3].any() and not up[H: 2 * H, 6:].any()
        assert torch.equal(up[3 * H:, 9:], peft[f"{p}.proj_mlp.lora_B.weight"])
    ma, mb = tmp_path / "ma.safetensors", tmp_path / "mb.safetensors"
    assert main(["merge", str(base / "base.safetensors"), f"{path}:0.7", "-o", str(ma)]) == 0
    assert main(["merge", str(base / "base.safetensors"), f"{kohya}:0.7", "-o", str(mb)]) == 0
    with open_file(ma) as a, open_file(mb) as b, open_file(base / "base.safetensors") as w:
        key = "double_blocks.3.txt_attn.qkv.weight"
        want = w.get(key).clone()
        for i, part in enumerate(("add_q_proj", "add_k_proj", "add_v_proj")):
            q = f"transformer.transformer_blocks.3.attn.{part}"
            want[i * H:(i + 1) * H] += 0.7 * ref(peft[f"{q}.lora_B.weight"], peft[f"{q}.lora_A.weight"])
        torch.testing.assert_close(b.get(key), want, rtol=1e-5, atol=1e-6)
        for key in a.keys():
            torch.testing.assert_close(b.get(key), a.get(key), rtol=1e-6, atol=1e-7)


def test_kohya_peft_kohya_round_trip_is_identity(tmp_path):
    from support.synth import make_lora

    kohya = make_lora("flux1", rank=4, alpha=2.0, components=("transformer",), dtype="F32")
    path = tmp_path / "k.safetensors"
    save_tensors(path, kohya)
    peft, back = tmp_path / "p.safetensors", tmp_path / "k2.safetensors"
    assert main(["convert", str(path), str(peft), "--to", "peft"]) == 0
    assert main(["convert", str(peft), str(back), "--to", "kohya"]) == 0
    assert_holds_exactly(back, kohya)


def test_split_qkv_file_written_back_keeps_its_delta(base, tmp_path):
    """A split_qkv file (per-part alpha, the metadata says split_qkv) converted to kohya stores alphas in the plain
    convention and drops split_qkv from its network args, so reading it again gives the same ΔW (no double count)."""
    n = "lora_unet_double_blocks_1_img_attn_qkv"
    lora, downs, ups = split_qkv_lora(H)
    up = lora[f"{n}.lora_up.weight"]
    src = tmp_path / "split.safetensors"
    save_tensors(src, lora, {"ss_network_args": '{"split_qkv": "True", "train_blocks": "all"}'})
    once, twice = tmp_path / "c1.safetensors", tmp_path / "c2.safetensors"
    assert main(["convert", str(src), str(once), "--to", "kohya"]) == 0
    assert main(["convert", str(once), str(twice), "--to", "kohya"]) == 0
    with open_file(twice) as t:
        assert float(t.get(f"{n}.alpha")) == 6.0  # 3 parts × the per-part alpha 2: alpha / 12 = 2 / 4
        assert "split_qkv" not in t.metadata["ss_network_args"] and "train_blocks" in t.metadata["ss_network_args"]
    out = tmp_path / "m.safetensors"
    assert main(["merge", str(base / "base.safetensors"), str(twice), "-o", str(out)]) == 0
    key = "double_blocks.1.img_attn.qkv.weight"
    with open_file(base / "base.safetensors") as b, open_file(out) as m:
        want = b.get(key).clone()
        for i in range(3):
            want[i * H:(i + 1) * H] += (2.0 / 4) * ref(ups[i], downs[i])
        torch.testing.assert_close(m.get(key), want, rtol=1e-5, atol=1e-6)
    # without split_qkv in the metadata a block-diagonal up is an ordinary LoRA: alpha / 12, as every loader reads it
    plain = tmp_path / "plain.safetensors"
    save_tensors(plain, lora)
    out2 = tmp_path / "m2.safetensors"
    assert main(["merge", str(base / "base.safetensors"), str(plain), "-o", str(out2)]) == 0
    with open_file(base / "base.safetensors") as b, open_file(out2) as m:
        want = b.get(key) + (2.0 / 12) * ref(up, torch.cat(downs))
        torch.testing.assert_close(m.get(key), want, rtol=1e-5, atol=1e-6)


def test_diffusers_reads_our_fused_kohya_file_as_the_peft_file(tmp_path):
    """The real consumer: a full-width PEFT LoRA on every diffusers Linear (rank 1, own downs), converted to kohya
    (block-diagonal fused modules, ``lora_unet_img_in``-style names, norm_out in BFL row order), loads in diffusers'
    kohya FLUX converter with all 504 modules, each with the ΔW of the PEFT module it came from."""
    pytest.importorskip("diffusers")
    from diffusers import FluxPipeline

    from loratool.adapters import delta, load_adapter

    peft = dict(iter_lora("flux1", rank=1, factor=1, naming="peft", modules=split_modules(), dtype="BF16",
                          components=("transformer",)))
    src, kohya = tmp_path / "p.safetensors", tmp_path / "k.safetensors"
    save_tensors(src, peft)
    assert main(["convert", str(src), str(kohya), "--to", "kohya"]) == 0
    theirs = FluxPipeline.lora_state_dict(str(kohya))
    theirs = theirs[0] if isinstance(theirs, tuple) else theirs
    # diffusers leaves the embedders' keys without the transformer. prefix at this stage
    theirs = {(k if k.startswith(("transformer.", "text_encoder.")) else "transformer." + k): v for k, v in theirs.items()}
    with open_file(src) as s:
        ours = {m.target.peft_module: m for m in load_adapter(s).modules.values()}
    modules = {k.removesuffix(".lora_A.weight") for k in theirs if k.endswith(".lora_A.weight")}
    assert modules == set(ours) and len(modules) == 504
    for name in sorted(modules)[::5] + ["transformer.norm_out.linear"]:
        a, b = theirs[f"{name}.lora_A.weight"].float(), theirs[f"{name}.lora_B.weight"].float()
        torch.testing.assert_close(b @ a, delta(ours[name]), rtol=2e-2, atol=1e-6)


def test_bfl_order_norm_out_module_merges_onto_the_right_rows(base, tmp_path):
    """``lora_unet_final_layer_adaLN_modulation_1`` is in BFL row order (no swap into a BFL file); PEFT's norm_out
    is in diffusers' order (its halves go to the swapped rows)."""
    g = torch.Generator().manual_seed(3)
    down, up = torch.randn(2, H, generator=g), torch.randn(2 * H, 2, generator=g)
    n = "lora_unet_final_layer_adaLN_modulation_1"
    kohya = tmp_path / "k.safetensors"
    save_tensors(kohya, {f"{n}.lora_down.weight": down, f"{n}.lora_up.weight": up, f"{n}.alpha": torch.tensor(2.0)})
    peft = tmp_path / "p.safetensors"
    save_tensors(peft, {"transformer.norm_out.linear.lora_A.weight": down, "transformer.norm_out.linear.lora_B.weight": up})
    key = "final_layer.adaLN_modulation.1.weight"
    for f, rows in ((kohya, up), (peft, torch.cat([up[H:], up[:H]]))):
        out = tmp_path / f"m-{f.stem}.safetensors"
        assert main(["merge", str(base / "base.safetensors"), str(f), "-o", str(out)]) == 0
        with open_file(base / "base.safetensors") as b, open_file(out) as m:
            torch.testing.assert_close(m.get(key), b.get(key) + ref(rows, down), rtol=1e-5, atol=1e-6)
    back = tmp_path / "back.safetensors"
    assert main(["convert", str(peft), str(back), "--to", "kohya"]) == 0
    with open_file(back) as k:
        assert torch.equal(k.get(f"{n}.lora_up.weight"), torch.cat([up[H:], up[:H]]))


def test_flux_block_weights_follow_the_61_slot_layout(base, tmp_path):
    """--lbw with 61 numbers (CLIP, T5, IN, D00–D18, S00–S37, OUT): each module's ΔW is scaled by its block's."""
    from support.synth import make_lora

    from loratool.arch import kohya_modules
    from loratool.blockweights import SLOTS_FLUX, parse_block_weights

    assert len(SLOTS_FLUX) == 61
    lora = make_lora("flux1", rank=2, alpha=2.0, components=("transformer",), dtype="F32")
    g = torch.Generator().manual_seed(9)
    lora["lora_unet_img_in.lora_down.weight"] = torch.randn(2, 64, generator=g)  # img_in: 64 inputs (16 latent × 2×2)
    lora["lora_unet_img_in.lora_up.weight"] = torch.randn(H, 2, generator=g)
    lora["lora_unet_img_in.alpha"] = torch.tensor(2.0)
    path = tmp_path / "k.safetensors"
    save_tensors(path, lora)
    weights = {slot: 1.0 for slot in SLOTS_FLUX}
    weights.update({"IN": 0.0, "D03": 0.25, "S07": 0.0, "S20": 2.0})
    lbw = ",".join(str(weights[s]) for s in SLOTS_FLUX)
    out = tmp_path / "m.safetensors"
    assert main(["merge", str(base / "base.safetensors"), f"{path}:0.5", "--lbw", lbw, "-o", str(out)]) == 0
    cases = {"double_blocks.3.img_mlp.0.weight": ("lora_unet_double_blocks_3_img_mlp_0", 0.25),
             "double_blocks.4.img_mlp.0.weight": ("lora_unet_double_blocks_4_img_mlp_0", 1.0),
             "single_blocks.20.linear2.weight": ("lora_unet_single_blocks_20_linear2", 2.0),
             "single_blocks.7.linear1.weight": ("lora_unet_single_blocks_7_linear1", 0.0),
             "img_in.weight": ("lora_unet_img_in", 0.0)}
    with open_file(base / "base.safetensors") as b, open_file(out) as m:
        for key, (n, w) in cases.items():
            want = b.get(key) + 0.5 * w * ref(lora[f"{n}.lora_up.weight"], lora[f"{n}.lora_down.weight"])
            torch.testing.assert_close(m.get(key), want, rtol=1e-5, atol=1e-6)
    bw = parse_block_weights(lbw.replace("1.0", "0.5", 2), "flux1")  # the first two slots: CLIP, T5
    te = kohya_modules("flux1")
    clip = next(t for t in te.values() if t.name.startswith("lora_te1_"))
    t5 = next(t for t in te.values() if t.name.startswith("lora_te3_"))
    assert bw.weight_for(clip) == 0.5 and bw.weight_for(t5) == 0.5
    wrong = ["merge", str(base / "base.safetensors"), str(path), "--lbw", "1,1,1", "-o", str(tmp_path / "x.safetensors")]
    assert main(wrong) == 2


def _all_in_one(base, tmp_path):
    with open_file(base / "base.safetensors") as b:
        tensors = {"model.diffusion_model." + k: b.get(k) for k in b.keys()}
    g = torch.Generator().manual_seed(4)
    tensors["text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight"] = torch.randn(48, 12, generator=g)
    tensors["text_encoders.clip_l.logit_scale"] = torch.tensor(4.6)
    tensors["text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.k.weight"] = torch.randn(32, 32, generator=g)
    tensors["text_encoders.t5xxl.transformer.shared.weight"] = torch.randn(10, 32, generator=g).half()
    tensors["vae.decoder.conv_in.weight"] = torch.randn(8, 16, 3, 3, generator=g)
    path = tmp_path / "aio.safetensors"
    save_tensors(path, tensors, {"modelspec.title": "tiny flux"})
    return path, tensors


def test_comfyui_all_in_one_splits_into_component_files_and_joins_back(base, tmp_path):
    path, tensors = _all_in_one(base, tmp_path)
    parts = tmp_path / "parts"
    assert main(["convert", str(path), str(parts), "--to", "components"]) == 0
    assert sorted(p.name for p in parts.iterdir()) == ["ae.safetensors", "clip_l.safetensors", "t5xxl.safetensors",
                                                        "transformer.safetensors"]
    with open_file(parts / "clip_l.safetensors") as c, open_file(parts / "t5xxl.safetensors") as t, \
            open_file(parts / "transformer.safetensors") as x, open_file(parts / "ae.safetensors") as v:
        assert sorted(c.keys()) == ["logit_scale", "text_model.encoder.layers.0.mlp.fc1.weight"]
        assert sorted(t.keys()) == ["encoder.block.0.layer.0.SelfAttention.k.weight", "shared.weight"]
        assert list(v.keys()) == ["decoder.conv_in.weight"]
        assert "double_blocks.0.img_attn.qkv.weight" in set(x.keys()) and x.metadata["modelspec.title"] == "tiny flux"
        assert torch.equal(t.get("shared.weight"), tensors["text_encoders.t5xxl.transformer.shared.weight"])
    joined = tmp_path / "joined.safetensors"
    assert main(["convert", str(parts / "transformer.safetensors"), str(joined), "--to", "comfyui",
                 "--clip-l", str(parts / "clip_l.safetensors"), "--t5", str(parts / "t5xxl.safetensors"),
                 "--vae", str(parts / "ae.safetensors")]) == 0
    assert joined.read_bytes() == path.read_bytes()  # same keys, tensors, dtypes, metadata: the same bytes
    # the split transformer is a BFL file: it merges like one
    assert main(["inspect", str(parts / "transformer.safetensors")]) == 0


def test_split_and_join_report_every_tensor_streamed(base, tmp_path, capsys):
    """The join streams four files one after the other: its report adds their runs up (each tensor copied raw)."""
    import json

    path, tensors = _all_in_one(base, tmp_path)
    parts = tmp_path / "parts"
    capsys.readouterr()
    assert main(["convert", str(path), str(parts), "--to", "components", "--json"]) == 0
    split = json.loads(capsys.readouterr().out)["stream"]
    assert main(["convert", str(parts / "transformer.safetensors"), str(tmp_path / "j.safetensors"), "--to", "comfyui",
                 "--clip-l", str(parts / "clip_l.safetensors"), "--t5", str(parts / "t5xxl.safetensors"),
                 "--vae", str(parts / "ae.safetensors"), "--json"]) == 0
    join = json.loads(capsys.readouterr().out)["stream"]
    for report in (split, join):
        assert (report["tensors_copied"], report["tensors_computed"]) == (len(tensors), 0)


def test_component_files_are_checked_and_stray_keys_refused(base, tmp_path, capsys):
    path, tensors = _all_in_one(base, tmp_path)
    parts = tmp_path / "parts"
    assert main(["convert", str(path), str(parts), "--to", "components"]) == 0
    capsys.readouterr()
    out = tmp_path / "x.safetensors"
    rc = main(["convert", str(parts / "transformer.safetensors"), str(out), "--to", "comfyui",
               "--clip-l", str(parts / "t5xxl.safetensors")])
    assert rc == 2 and not out.exists()
    assert "CLIP-L" in capsys.readouterr().err
    stray = dict(tensors)
    stray["something_else.weight"] = torch.zeros(2)
    save_tensors(tmp_path / "stray.safetensors", stray)
    assert main(["convert", str(tmp_path / "stray.safetensors"), str(tmp_path / "p2"), "--to", "components"]) == 2
    assert "something_else.weight" in capsys.readouterr().err and not (tmp_path / "p2").exists()


def test_onetrainer_dora_file_with_text_encoders_merges_into_a_comfyui_file(base, tmp_path):
    """OneTrainer names FLUX modules after diffusers' (lora_transformer_…), CLIP-L lora_te1_, T5 lora_te2_, and stores
    DoRA magnitudes per input column (1, in); merged into a ComfyUI all-in-one file, a DoRA module on a q/k/v slice
    is normalised over that slice's rows only."""
    path, tensors = _all_in_one(base, tmp_path)
    t5q = "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight"
    tensors[t5q] = torch.randn(32, 32, generator=torch.Generator().manual_seed(8))
    save_tensors(path, tensors, {"modelspec.title": "tiny flux"}, force=True)
    g = torch.Generator().manual_seed(12)
    lora = {}

    def module(name, out_f, in_f, dora):
        lora[f"{name}.lora_down.weight"] = torch.randn(4, in_f, generator=g) * 0.3
        lora[f"{name}.lora_up.weight"] = torch.randn(out_f, 4, generator=g) * 0.3
        lora[f"{name}.alpha"] = torch.tensor(2.0)
        if dora:
            lora[f"{name}.dora_scale"] = torch.rand(1, in_f, generator=g) + 0.5

    module("lora_transformer_transformer_blocks_2_attn_to_k", H, H, True)
    module("lora_te1_text_model_encoder_layers_0_mlp_fc1", 48, 12, False)
    module("lora_te2_encoder_block_0_layer_0_SelfAttention_q", 32, 32, True)
    lpath = tmp_path / "onetrainer.safetensors"
    save_tensors(lpath, lora)
    out = tmp_path / "m.safetensors"
    assert main(["merge", str(path), f"{lpath}:0.8", "-o", str(out)]) == 0

    def dora_ref(w, name, ratio):
        v = w.double() + 0.5 * ref(lora[f"{name}.lora_up.weight"], lora[f"{name}.lora_down.weight"]).double()
        col = torch.sqrt((v * v).sum(dim=0, keepdim=True))  # one norm per input column
        wd = v * (lora[f"{name}.dora_scale"].double() / col)
        return (w.double() + ratio * (wd - w.double())).float()

    with open_file(path) as b, open_file(out) as m:
        key = "model.diffusion_model.double_blocks.2.img_attn.qkv.weight"
        w, got = b.get(key), m.get(key)
        torch.testing.assert_close(got[H:2 * H], dora_ref(w[H:2 * H], "lora_transformer_transformer_blocks_2_attn_to_k", 0.8),
                                   rtol=1e-5, atol=1e-6)
        assert torch.equal(got[:H], w[:H]) and torch.equal(got[2 * H:], w[2 * H:])
        torch.testing.assert_close(m.get(t5q), dora_ref(b.get(t5q), "lora_te2_encoder_block_0_layer_0_SelfAttention_q", 0.8),
                                   rtol=1e-5, atol=1e-6)
        fc1 = "text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
        n = "lora_te1_text_model_encoder_layers_0_mlp_fc1"
        torch.testing.assert_close(m.get(fc1), b.get(fc1) + 0.8 * 0.5 * ref(lora[f"{n}.lora_up.weight"],
                                                                             lora[f"{n}.lora_down.weight"]),
                                   rtol=1e-5, atol=1e-6)


def control_lora(factor: int, rank: int, dtype=torch.float32, full: bool = False) -> dict[str, torch.Tensor]:
    """A BFL control LoRA (FLUX.1 Depth/Canny LoRA layout): bare BFL names, lora_A / lora_B with lora_B.bias, img_in
    taking 2× the latent inputs, and the q/k norm scales in full. ``full``: every layer diffusers' converter needs."""
    from loratool.arch.flux_naming import extra_kohya_modules

    g = torch.Generator().manual_seed(21)
    config = tiny_config("flux1", factor) if factor > 1 else None
    targets = [t for t in (*__import__("loratool.arch", fromlist=["kohya_modules"]).kohya_modules("flux1").values(),
                           *extra_kohya_modules().values()) if t.component == "transformer"]
    if not full:
        keep = ("img_in.weight", "double_blocks.0.img_attn.qkv.weight", "single_blocks.1.linear1.weight")
        targets = [t for t in targets if t.address in keep]
    out = {}
    for t in targets:
        rows, cols = (t.sized(config) if config else t).target_shape
        if t.address == "img_in.weight":
            cols *= 2  # the control image's latents beside the noisy latents
        path = t.address.removesuffix(".weight")
        out[f"{path}.lora_A.weight"] = (torch.randn(rank, cols, generator=g) * 0.1).to(dtype)
        out[f"{path}.lora_B.weight"] = (torch.randn(rows, rank, generator=g) * 0.1).to(dtype)
        out[f"{path}.lora_B.bias"] = (torch.randn(rows, generator=g) * 0.1).to(dtype)
    width = H if config else 3072
    head = 16 if config else 128
    out["final_layer.adaLN_modulation.1.lora_A.weight"] = (torch.randn(rank, width, generator=g) * 0.1).to(dtype)
    out["final_layer.adaLN_modulation.1.lora_B.weight"] = (torch.randn(2 * width, rank, generator=g) * 0.1).to(dtype)
    out["final_layer.adaLN_modulation.1.lora_B.bias"] = (torch.randn(2 * width, generator=g) * 0.1).to(dtype)
    blocks = [("double_blocks", 19, ("img_attn", "txt_attn")), ("single_blocks", 38, ("",))] if full else \
        [("double_blocks", 1, ("img_attn",)), ("single_blocks", 2, ("",))]
    for kind, n, streams in blocks:
        for i in range(n) if full else [n - 1]:
            for stream_ in streams:
                for which in ("query_norm", "key_norm"):
                    mid = f"{stream_}.norm" if stream_ else "norm"
                    out[f"{kind}.{i}.{mid}.{which}.scale"] = (torch.rand(head, generator=g) + 0.5).to(dtype)
    return out


def test_control_lora_merges_into_a_dev_file_as_a_depth_layout_checkpoint(base, tmp_path, capsys):
    """img_in is widened with zero columns (as diffusers expands x_embedder), then W + ratio·B@A; every bias gets
    ratio·lora_B.bias; the norm scales are set to the LoRA's (at any ratio, as diffusers' loader does)."""
    lora = control_lora(64, rank=3)
    path = tmp_path / "depth-lora.safetensors"
    save_tensors(path, lora)
    assert main(["inspect", str(path)]) == 0
    out = tmp_path / "m.safetensors"
    assert main(["merge", str(base / "base.safetensors"), f"{path}:0.9", "-o", str(out)]) == 0
    with open_file(base / "base.safetensors") as b, open_file(out) as m:
        w = b.get("img_in.weight")
        want = torch.cat([w, torch.zeros_like(w)], dim=1) + 0.9 * ref(lora["img_in.lora_B.weight"], lora["img_in.lora_A.weight"])
        torch.testing.assert_close(m.get("img_in.weight"), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m.get("img_in.bias"), b.get("img_in.bias") + 0.9 * lora["img_in.lora_B.bias"])
        q = "double_blocks.0.img_attn.qkv"
        torch.testing.assert_close(m.get(f"{q}.weight"), b.get(f"{q}.weight") + 0.9 * ref(lora[f"{q}.lora_B.weight"],
                                                                                          lora[f"{q}.lora_A.weight"]),
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m.get(f"{q}.bias"), b.get(f"{q}.bias") + 0.9 * lora[f"{q}.lora_B.bias"])
        f = "final_layer.adaLN_modulation.1"  # BFL row order in the file: no swap into a BFL base
        torch.testing.assert_close(m.get(f"{f}.weight"), b.get(f"{f}.weight") + 0.9 * ref(lora[f"{f}.lora_B.weight"],
                                                                                          lora[f"{f}.lora_A.weight"]),
                                   rtol=1e-5, atol=1e-6)
        for key in ("double_blocks.0.img_attn.norm.query_norm.scale", "single_blocks.1.norm.key_norm.scale"):
            assert torch.equal(m.get(key), lora[key])
        assert torch.equal(m.get("txt_in.weight"), b.get("txt_in.weight"))
    capsys.readouterr()
    assert main(["inspect", "--json", str(out)]) == 0
    assert "FLUX.1-depth" in capsys.readouterr().out
    # into a diffusers folder the widened x_embedder would contradict its config.json: refused, nothing written
    folder = tmp_path / "folder"
    assert main(["convert", str(base / "base.safetensors"), str(folder), "--to", "diffusers"]) == 0
    assert main(["merge", str(folder), str(path), "-o", str(tmp_path / "mf")]) == 2
    assert not (tmp_path / "mf").exists()
    assert main(["convert", str(path), str(tmp_path / "k.safetensors"), "--to", "kohya"]) == 2


def test_diffusers_bfl_control_converter_agrees_with_our_peft_conversion(tmp_path):
    """diffusers' own BFL control-LoRA converter (real widths: a full-width rank-2 file) gives the same modules,
    ΔW, biases and norm weights as our --to peft conversion of that file — except norm_out, where diffusers swaps
    the halves of lora_A as well as lora_B (a permutation of the rank axis that changes ΔW; at rank 1 it fails):
    there our lora_B is the file's with its halves swapped and our lora_A is the file's, ΔW in diffusers' order."""
    pytest.importorskip("diffusers")
    from diffusers.loaders.lora_conversion_utils import _convert_bfl_flux_control_lora_to_diffusers

    lora = control_lora(1, rank=2, dtype=torch.bfloat16, full=True)
    src, peft = tmp_path / "control.safetensors", tmp_path / "peft.safetensors"
    save_tensors(src, lora)
    assert main(["convert", str(src), str(peft), "--to", "peft"]) == 0
    theirs = _convert_bfl_flux_control_lora_to_diffusers(dict(lora))
    with open_file(peft) as p:
        ours = {k: p.get(k) for k in p.keys()}
    mods = lambda sd: {k.rsplit(".lora_", 1)[0] for k in sd if ".lora_" in k}  # noqa: E731
    assert mods(ours) == mods(theirs)
    assert {k for k in ours if ".lora_" not in k} == {k for k in theirs if ".lora_" not in k}  # the norm weights
    norm_out = "transformer.norm_out.linear"
    f = "final_layer.adaLN_modulation.1"
    half = lambda x: torch.cat([x[x.shape[0] // 2:], x[: x.shape[0] // 2]])  # noqa: E731
    assert torch.equal(ours[f"{norm_out}.lora_B.weight"], half(lora[f"{f}.lora_B.weight"]))
    assert torch.equal(ours[f"{norm_out}.lora_A.weight"], lora[f"{f}.lora_A.weight"])
    assert torch.equal(ours[f"{norm_out}.lora_B.bias"], half(lora[f"{f}.lora_B.bias"]))
    assert torch.equal(theirs[f"{norm_out}.lora_A.weight"], half(lora[f"{f}.lora_A.weight"]))  # the rank axis swapped
    for k in theirs:  # every other factor, bias and norm weight: the same tensor, bit for bit
        if k != f"{norm_out}.lora_A.weight":
            assert torch.equal(ours[k], theirs[k]), k


def test_extract_all_layers_takes_the_embedders_and_norm_out_in_bfl_order(base, tmp_path):
    """--all-layers adds img_in, txt_in, time_in, vector_in, guidance_in, final_layer.linear and norm_out (as
    lora_unet_final_layer_adaLN_modulation_1, BFL row order) to kohya's 304 modules; from diffusers folders the
    same ΔW comes out (norm_out's halves swapped back)."""
    from loratool.adapters import delta, load_adapter
    from loratool.ops.extract import plan_targets

    names = {t.name for t in plan_targets("flux1", True, False)[0]}
    assert len(names) == 304 + 9 + 1 and {"lora_unet_img_in", "lora_unet_guidance_in_out_layer"} <= names
    g = torch.Generator().manual_seed(30)
    planted = {}
    for n, (rows, cols) in {"lora_unet_img_in": (H, 64), "lora_unet_final_layer_adaLN_modulation_1": (2 * H, H),
                            "lora_unet_double_blocks_1_img_mlp_0": (4 * H, H)}.items():
        planted[f"{n}.lora_down.weight"] = torch.randn(2, cols, generator=g) * 0.5
        planted[f"{n}.lora_up.weight"] = torch.randn(rows, 2, generator=g) * 0.5
        planted[f"{n}.alpha"] = torch.tensor(2.0)
    lpath = tmp_path / "planted.safetensors"
    save_tensors(lpath, planted)
    tuned = tmp_path / "tuned.safetensors"
    assert main(["merge", str(base / "base.safetensors"), str(lpath), "-o", str(tuned)]) == 0
    out = tmp_path / "e.safetensors"
    assert main(["extract", str(tuned), str(base / "base.safetensors"), "--rank", "2", "--all-layers", "-o", str(out)]) == 0
    folders = tmp_path / "tf", tmp_path / "bf"
    for src, dst in zip((tuned, base / "base.safetensors"), folders):
        assert main(["convert", str(src), str(dst), "--to", "diffusers"]) == 0
    out2 = tmp_path / "e2.safetensors"
    assert main(["extract", str(folders[0]), str(folders[1]), "--rank", "2", "--all-layers", "-o", str(out2)]) == 0
    with open_file(lpath) as p, open_file(out) as e, open_file(out2) as e2:
        want, got, got2 = load_adapter(p).modules, load_adapter(e).modules, load_adapter(e2).modules
        assert set(got) == set(got2) == set(want)  # the other 311 targets are unchanged: skipped
        for name, m in want.items():
            for g_ in (got, got2):
                err = (delta(g_[m.target.name]) - delta(m)).norm() / delta(m).norm()
                assert float(err) < 5e-3, (name, float(err))  # the planted ΔW, up to the output dtype's rounding


def test_scaled_fp8_converts_both_ways(base, tmp_path, capsys):
    """--dtype fp8_e4m3fn --scaled writes ComfyUI scaled fp8 (scale_weight = max|W| / 448 per transformer weight,
    the scaled_fp8 marker); --dtype bf16 of that file dequantizes (stored · scale_weight) and drops the scale keys.
    A plain cast of the stored values would be wrong by the scale: the values are compared to the original."""
    src = base / "base.safetensors"
    fp8 = tmp_path / "fp8.safetensors"
    assert main(["convert", str(src), str(fp8), "--dtype", "fp8_e4m3fn", "--scaled"]) == 0
    key = "single_blocks.3.linear2.weight"
    with open_file(src) as b, open_file(fp8) as f:
        w = b.get(key)
        scale = f.get("single_blocks.3.linear2.scale_weight")
        assert scale.dtype == torch.float32 and float(scale) == pytest.approx(float(w.abs().max()) / 448, rel=1e-6)
        stored = f.get(key)
        assert stored.dtype == torch.float8_e4m3fn
        assert torch.equal(stored, (w / scale).clamp(-448, 448).to(torch.float8_e4m3fn))
        assert f.get("single_blocks.3.linear2.bias").dtype == b.get("single_blocks.3.linear2.bias").dtype
        assert "scaled_fp8" in set(f.keys())
    capsys.readouterr()
    assert main(["inspect", str(fp8)]) == 0
    assert "scaled fp8" in capsys.readouterr().out
    back = tmp_path / "bf16.safetensors"
    assert main(["convert", str(fp8), str(back), "--dtype", "bf16"]) == 0
    with open_file(src) as b, open_file(back) as f:
        keys = set(f.keys())
        assert not any(k.endswith("scale_weight") for k in keys) and "scaled_fp8" not in keys
        assert keys == set(b.keys())
        got, w = f.get(key).float(), b.get(key)
        assert float((got - w).abs().max()) <= float(w.abs().max()) / 8  # within one fp8 step of the original
        assert main(["convert", str(fp8), str(tmp_path / "d"), "--to", "diffusers"]) == 2  # dequantize first


def test_lora_plus_lora_concat_across_kohya_peft_and_xlabs_is_exact(base, tmp_path):
    """merge kohya + PEFT + XLabs LoRAs into one LoRA (--mode concat): the PEFT parts and XLabs processors join
    their kohya module first; the merged LoRA applied to the base equals W + Σ ratioᵢ·scaleᵢ·ΔWᵢ on the rows."""
    from support.synth import make_lora

    kohya = make_lora("flux1", rank=4, alpha=2.0, components=("transformer",), dtype="F32")
    peft = dict(iter_lora("flux1", rank=3, naming="peft", modules=split_modules(), dtype="F32",
                          components=("transformer",)))
    xl = xlabs_lora(64, rank=2, seed=4)
    paths = []
    for name, sd in (("k", kohya), ("p", peft), ("x", xl)):
        paths.append(tmp_path / f"{name}.safetensors")
        save_tensors(paths[-1], sd)
    one = tmp_path / "one.safetensors"
    assert main(["merge", f"{paths[0]}:0.5", f"{paths[1]}:0.7", f"{paths[2]}:-0.4", "-o", str(one)]) == 0
    out = tmp_path / "m.safetensors"
    assert main(["merge", str(base / "base.safetensors"), str(one), "-o", str(out)]) == 0
    key = "single_blocks.6.linear1.weight"
    with open_file(base / "base.safetensors") as b, open_file(out) as m:
        want = b.get(key).clone()
        n = "lora_unet_single_blocks_6_linear1"
        want += 0.5 * (2.0 / 4) * ref(kohya[f"{n}.lora_up.weight"], kohya[f"{n}.lora_down.weight"])
        p = "transformer.single_transformer_blocks.6"
        for part, (lo, hi) in (("attn.to_q", (0, H)), ("attn.to_k", (H, 2 * H)), ("attn.to_v", (2 * H, 3 * H)),
                               ("proj_mlp", (3 * H, 7 * H))):
            want[lo:hi] += 0.7 * ref(peft[f"{p}.{part}.lora_B.weight"], peft[f"{p}.{part}.lora_A.weight"])
        x = "single_blocks.6.processor.qkv_lora"
        want[: 3 * H] += -0.4 * ref(xl[f"{x}.up.weight"], xl[f"{x}.down.weight"])
        torch.testing.assert_close(m.get(key), want, rtol=1e-4, atol=1e-5)


def test_kohya_to_comfyui_names_and_back(base, tmp_path):
    """--to comfyui writes diffusion_model.<BFL path>.lora_A / lora_B / alpha (fused modules, norm_out in BFL order);
    read back and converted to kohya it is the original file, tensor for tensor."""
    from support.synth import make_lora

    kohya = make_lora("flux1", rank=4, alpha=2.0, components=("transformer",), dtype="F32")
    src, comfy, back = tmp_path / "k.safetensors", tmp_path / "c.safetensors", tmp_path / "k2.safetensors"
    save_tensors(src, kohya)
    assert main(["convert", str(src), str(comfy), "--to", "comfyui"]) == 0
    with open_file(comfy) as c:
        keys = set(c.keys())
        assert all(k.startswith("diffusion_model.") for k in keys)
        n = "lora_unet_single_blocks_2_linear1"
        assert torch.equal(c.get("diffusion_model.single_blocks.2.linear1.lora_B.weight"), kohya[f"{n}.lora_up.weight"])
        assert float(c.get("diffusion_model.single_blocks.2.linear1.alpha")) == 2.0
    assert main(["convert", str(comfy), str(back), "--to", "kohya"]) == 0
    assert_holds_exactly(back, kohya)


def test_bfl_diffusers_bfl_round_trip_is_byte_identical(base, tmp_path):
    """The folder's weight files keep the single file's metadata (loratool.single_file_metadata, beside diffusers'
    "format"), so converting it back writes the same bytes."""
    folder, back = tmp_path / "f", tmp_path / "back.safetensors"
    assert main(["convert", str(base / "base.safetensors"), str(folder), "--to", "diffusers"]) == 0
    assert main(["convert", str(folder), str(back), "--to", "ldm"]) == 0
    assert back.read_bytes() == (base / "base.safetensors").read_bytes()


@pytest.mark.parametrize("family", ["loha", "lokr"])
def test_lycoris_flux_file_becomes_a_lora_with_its_delta(base, tmp_path, family):
    """A LyCORIS LoHa / LoKr on the BFL modules (lycoris_ names, as LyCORIS saves FLUX files) → --to lora: the plain
    LoRA merged into the base equals the LyCORIS file merged (exact up to the rank-revealing factorisation)."""
    from support.synth import make_loha, make_lokr

    from loratool.arch import kohya_modules

    mods = {n: t for n, t in kohya_modules("flux1").items() if t.component == "transformer"}
    mods = dict(list(sorted(mods.items()))[::19])
    make = make_loha if family == "loha" else make_lokr
    lyco = make("flux1", dtype="F32", components=("transformer",), modules=mods)
    lyco = {("lycoris_" + k[len("lora_unet_"):]): v for k, v in lyco.items()}
    src, lora = tmp_path / "lyco.safetensors", tmp_path / "lora.safetensors"
    save_tensors(src, lyco)
    assert main(["convert", str(src), str(lora), "--to", "lora"]) == 0
    outs = []
    for f in (src, lora):
        outs.append(tmp_path / f"m-{f.stem}.safetensors")
        assert main(["merge", str(base / "base.safetensors"), str(f), "-o", str(outs[-1])]) == 0
    with open_file(outs[0]) as a, open_file(outs[1]) as b:
        for t in mods.values():
            torch.testing.assert_close(b.get(t.address), a.get(t.address), rtol=1e-4, atol=1e-5)


def test_xlabs_into_a_diffusers_folder_equals_the_bfl_merge_converted(base, tmp_path):
    lora = tmp_path / "xlabs.safetensors"
    save_tensors(lora, xlabs_lora(64, rank=2, seed=6))
    folder = tmp_path / "folder"
    assert main(["convert", str(base / "base.safetensors"), str(folder), "--to", "diffusers"]) == 0
    bfl, via_folder, converted = tmp_path / "m.safetensors", tmp_path / "mf", tmp_path / "mc"
    assert main(["merge", str(base / "base.safetensors"), f"{lora}:0.6", "-o", str(bfl)]) == 0
    assert main(["merge", str(folder), f"{lora}:0.6", "-o", str(via_folder)]) == 0
    assert main(["convert", str(bfl), str(converted), "--to", "diffusers"]) == 0
    with open_file(via_folder) as a, open_file(converted) as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for k in a.keys():
            torch.testing.assert_close(a.get(k), b.get(k), rtol=1e-6, atol=1e-7)
