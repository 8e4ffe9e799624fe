"""Full-checkpoint conversion: round trips are byte-identical, transforms are the known ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loratool.arch.sd_checkpoint import checkpoint_links
from loratool.detect import detect_checkpoint
from loratool.errors import LoratoolError, MappingError, OutputError
from loratool.io.source import MemorySource, open_file
from loratool.ops.layout import convert_checkpoint

CASES = [("sd15", "sd1"), ("sd21", "sd2"), ("sdxl", "sdxl")]


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Each fixture converted to a diffusers folder and back to a single file (once per test module)."""
    root = tmp_path_factory.mktemp("convert")
    fixtures = Path(__file__).resolve().parent.parent / "fixtures"
    out = {}
    for name, arch in CASES:
        src = fixtures / f"{name}-tiny.safetensors"
        calls = []
        report = convert_checkpoint(src, root / name, "diffusers", on_progress=lambda d, t, k, c=calls: c.append((d, t, k)))
        back = convert_checkpoint(root / name, root / f"{name}-back.safetensors", "ldm")
        out[arch] = (src, root / name, root / f"{name}-back.safetensors", report, back, calls)
    return out


@pytest.mark.parametrize("arch", [a for _, a in CASES])
def test_round_trip_is_byte_identical(folders, arch):
    src_path, _, back_path, report, back, _ = folders[arch]
    src, again = open_file(src_path), open_file(back_path)
    links = checkpoint_links(arch)
    both = [k for k in src.keys() if k not in links.ldm_only]
    assert sorted(again.keys()) == sorted(both)
    for key in both:
        assert again.spec(key) == src.spec(key), key
        assert _bytes(again.get(key)) == _bytes(src.get(key)), key
    # what was left out is exactly the one-sided part, each with its reason
    assert {k for k, _ in report.dropped} == set(src.keys()) - set(both)
    assert all(why for _, why in report.dropped)
    assert back.dropped == () and back.unmapped == () and back.missing == ()
    assert {k for k, _ in back.omitted} == set(links.ldm_only)


@pytest.mark.parametrize("arch", [a for _, a in CASES])
def test_converted_tensors_are_the_known_transforms(folders, arch):
    src_path, folder, *_ = folders[arch]
    src, dif = open_file(src_path), open_file(folder)
    links = checkpoint_links(arch)
    assert set(dif.keys()) == set(links.by_diffusers)
    seen = set()
    for ldm_key, group in links.by_ldm.items():
        w = src.get(ldm_key)
        if len(group) == 3:
            # OpenCLIP fused q/k/v: equal thirds in q, k, v order
            expected = dict(zip([lk.diffusers_key for lk in group], torch.chunk(w, 3, dim=0), strict=True))
        elif group[0].transform == "conv1x1_linear":
            assert w.shape[2:] == (1, 1)
            expected = {group[0].diffusers_key: w[:, :, 0, 0]}
        elif group[0].transform == "transpose":
            expected = {group[0].diffusers_key: w.T}
        else:
            expected = {group[0].diffusers_key: w}
        for key, value in expected.items():
            got = dif.get(key)
            assert got.dtype == value.dtype and torch.equal(got, value), key
            seen.add(key)
    assert seen == set(dif.keys())
    if arch == "sdxl":
        proj = dif.get("text_encoder_2/text_projection.weight")
        assert not torch.equal(proj, src.get("conditioner.embedders.1.model.text_projection"))  # really transposed


@pytest.mark.parametrize("arch", [a for _, a in CASES])
def test_folder_opens_and_detects_as_diffusers(folders, arch):
    _, folder, _, report, _, calls = folders[arch]
    src = open_file(folder)
    match = detect_checkpoint({k: src.spec(k) for k in src.keys()})
    assert (match.arch, match.naming) == (arch, "diffusers")
    assert match.coverage == 1.0 and match.precision == 1.0
    index = json.loads((folder / "model_index.json").read_text())
    comps = {k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is not None}
    assert comps == {p.name for p in folder.iterdir() if p.is_dir()}
    assert {"scheduler", "tokenizer"} <= comps
    for comp in comps:
        names = ("config.json", "scheduler_config.json", "tokenizer_config.json")
        config = next(f for f in names if (folder / comp / f).is_file())
        assert json.loads((folder / comp / config).read_text())
    unet = json.loads((folder / "unet" / "config.json").read_text())
    assert unet["in_channels"] == 4 and unet["use_linear_projection"] == (arch != "sd1")
    assert not list(folder.parent.glob(".*tmp*"))
    # progress: one call per tensor, in order, ending at total
    assert [c[0] for c in calls] == list(range(1, report.written + 1))
    assert calls[-1][1] == report.written == len(src.keys())


def test_dtype_cast_keeps_values(tmp_path, fixtures):
    report = convert_checkpoint(fixtures / "sd15-tiny.safetensors", tmp_path / "f32", "diffusers", dtype="fp32")
    assert report.dtype == "F32"
    src, out = open_file(fixtures / "sd15-tiny.safetensors"), open_file(tmp_path / "f32")
    key = "unet/conv_in.weight"
    assert out.spec(key).dtype == "F32"
    assert torch.equal(out.get(key), src.get("model.diffusion_model.input_blocks.0.0.weight").float())


def test_diffusers_to_diffusers_is_a_copy(tmp_path, folders):
    folder = folders["sdxl"][1]
    report = convert_checkpoint(folder, tmp_path / "copy", "diffusers", dtype="bf16")
    assert report.written == 2641 and report.transforms == {}
    src, out = open_file(folder), open_file(tmp_path / "copy")
    assert set(out.keys()) == set(src.keys())
    key = "text_encoder_2/text_projection.weight"
    assert out.spec(key).dtype == "BF16" and torch.equal(out.get(key), src.get(key).to(torch.bfloat16))


def _small_sd1(extra: dict[str, torch.Tensor] | None = None) -> MemorySource:
    src = open_file(Path(__file__).resolve().parent.parent / "fixtures" / "sd15-tiny.safetensors")
    tensors = {k: src.get(k) for k in src.keys()}
    tensors.update(extra or {})
    return MemorySource(tensors)


def test_unknown_keys_are_an_error_unless_allowed(tmp_path):
    src = _small_sd1({"my_custom.thing": torch.zeros(3)})
    with pytest.raises(MappingError, match="my_custom.thing"):
        convert_checkpoint(src, tmp_path / "x", "diffusers")
    assert not (tmp_path / "x").exists()
    report = convert_checkpoint(src, tmp_path / "x", "diffusers", allow_unmapped=True)
    assert report.unmapped == ("my_custom.thing",)
    as_json = json.loads(json.dumps(report.as_dict(), sort_keys=True))
    assert as_json["unmapped"] == ["my_custom.thing"] and as_json["arch"] == "sd1"
    assert {"key": "betas", "reason": dict(report.dropped)["betas"]} in as_json["dropped"]


def test_ema_shadow_weights_are_dropped_with_reason(tmp_path):
    src = _small_sd1({"model_ema.diffusion_modelinput_blocks00weight": torch.zeros(5, 4, 3, 3)})
    report = convert_checkpoint(src, tmp_path / "x", "diffusers")
    reasons = dict(report.dropped)
    assert "EMA" in reasons["model_ema.diffusion_modelinput_blocks00weight"]
    assert "schedule" in reasons["betas"]


def test_partial_fused_group_is_refused(tmp_path, folders):
    folder = folders["sd2"][1]
    src = open_file(folder)
    tensors = {k: src.get(k) for k in src.keys() if k != "text_encoder/text_model.encoder.layers.3.self_attn.k_proj.weight"}
    with pytest.raises(MappingError, match="k_proj"):
        convert_checkpoint(MemorySource(tensors), tmp_path / "x.safetensors", "ldm")


def test_missing_component_is_reported(tmp_path, folders):
    src = open_file(folders["sd1"][1])
    tensors = {k: src.get(k) for k in src.keys() if not k.startswith("vae/")}
    report = convert_checkpoint(MemorySource(tensors), tmp_path / "x.safetensors", "ldm", arch="sd1")
    assert len(report.missing) == 248 and all(k.startswith("first_stage_model.") for k in report.missing)


def test_outputs_are_checked(tmp_path, fixtures, folders):
    out = tmp_path / "folder"
    convert_checkpoint(fixtures / "sd15-tiny.safetensors", out, "diffusers")
    marker = out / "unet" / "config.json"
    before = marker.stat().st_mtime_ns
    with pytest.raises(OutputError, match="already exists"):
        convert_checkpoint(fixtures / "sd15-tiny.safetensors", out, "diffusers")
    assert marker.stat().st_mtime_ns == before
    convert_checkpoint(fixtures / "sd21-tiny.safetensors", out, "diffusers", force=True)
    assert detect_checkpoint({k: s for k, s in open_file(out).specs().items()}).arch == "sd2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]  # no temp or old folders left
    with pytest.raises(OutputError):
        convert_checkpoint(out, out, "ldm", force=True)
    with pytest.raises(OutputError, match="inside the input folder"):
        convert_checkpoint(out, out / "model.safetensors", "ldm")
    with pytest.raises(LoratoolError, match="already"):
        convert_checkpoint(fixtures / "sd15-tiny.safetensors", tmp_path / "y.safetensors", "ldm")


def test_failure_mid_write_leaves_nothing(tmp_path):
    class Broken(MemorySource):
        def get(self, key):
            if key.startswith("first_stage_model."):
                raise OSError("disk read failed")
            return super().get(key)

    good = _small_sd1()
    src = Broken({k: good.get(k) for k in good.keys()})
    with pytest.raises(OSError):
        convert_checkpoint(src, tmp_path / "x", "diffusers")
    assert list(tmp_path.iterdir()) == []
