"""Detection with evidence: every reference table in loratool/layouts/data is recognised from key+shape specs alone."""

from __future__ import annotations

import pytest
import torch
from support.synth import checkpoint_specs

from loratool import dtypes
from loratool.arch import ARCHES, SD_ARCHES, adapter_layout, adapter_layout_names, checkpoint_layout, kohya_modules
from loratool.detect import detect_file
from loratool.errors import DetectionError
from loratool.inspection import inspect_source
from loratool.io.source import TensorSpec


class SpecSource:
    """Header-only source over a spec table; records which keys were read (alphas only, for inspect)."""

    format = "memory"

    def __init__(self, specs: dict[str, TensorSpec], metadata: dict[str, str] | None = None, values=None):
        self._specs = dict(specs)
        self.metadata = dict(metadata or {})
        self.path = "<specs>"
        self.read: list[str] = []
        self.values = values or {}

    def keys(self):
        return list(self._specs)

    def spec(self, key):
        return self._specs[key]

    def get(self, key):
        self.read.append(key)
        if key in self.values:
            return self.values[key]
        s = self._specs[key]
        return torch.ones(s.shape, dtype=dtypes.to_torch(s.dtype))

    def close(self):
        pass


EXPECTED_NAMING = {
    "lora-kohya": "kohya",
    "lora-peft": "peft",
    "lora-diffusers": "diffusers",
    "lycoris-loha": "kohya",
    "lycoris-lokr": "kohya",
}
EXPECTED_FAMILY = {
    "lora-kohya": "LoCon",  # kohya's reference network has conv_dim=4: LoRA + 3x3-conv modules
    "lora-peft": "LoRA",
    "lora-diffusers": "LoRA",
    "lycoris-loha": "LoHa",
    "lycoris-lokr": "LoKr",
}
ADAPTER_TABLES = [(a, n) for a in SD_ARCHES for n in adapter_layout_names(a)]  # FLUX: tests/test_flux.py


@pytest.mark.parametrize("arch,naming", ADAPTER_TABLES)
def test_every_adapter_table_is_detected(arch, naming):
    specs = adapter_layout(arch, naming)
    src = SpecSource(specs)
    report = inspect_source(src, hashes=False)
    det = report.detection
    assert det.kind == "adapter"
    assert det.arch == arch
    assert det.naming == EXPECTED_NAMING[naming]
    assert det.runner_up is not None and det.runner_up.arch != arch
    assert det.confidence > det.runner_up.score
    assert report.adapter.family == EXPECTED_FAMILY[naming]
    # every key lands exactly once: in a module or in the unmapped list
    mapped = [k for m in det.adapter_index.modules.values() for k in m.values()]
    assert sorted(mapped + list(report.adapter.unmapped)) == sorted(specs)
    if report.adapter.unmapped:
        assert any("map to no" in w for w in report.warnings)
    # header only: nothing but alpha scalars was read
    assert all(k.endswith(".alpha") for k in src.read)
    # the reference tables are rank 4
    assert {r for r, _, _ in report.adapter.rank_alpha} <= {4, None}


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("naming", ["ldm", "diffusers"])
@pytest.mark.parametrize("factor", [1, 64])
def test_every_checkpoint_table_is_detected(arch, naming, factor):
    specs = checkpoint_layout(arch, naming) if factor == 1 else checkpoint_specs(arch, naming, factor)
    src = SpecSource(specs)
    report = inspect_source(src)
    det = report.detection
    assert (det.kind, det.arch, det.naming) == ("checkpoint", arch, naming)
    assert det.runner_up.arch != arch and det.runner_up.score < det.confidence
    assert src.read == []  # header only: no tensor data, no hash by default
    assert report.hashes is None
    assert sum(report.components.values()) == len(specs)


def test_forced_arch_is_marked():
    det = detect_file(adapter_layout("sd1", "lora-peft"), arch="sd1")
    assert det.forced and det.arch == "sd1"
    det = detect_file(checkpoint_layout("sd2", "ldm"), arch="sd2")
    assert det.forced and det.arch == "sd2"


def test_ambiguous_adapter_raises_with_arch_hint():
    # A resnet conv module has the same name and shape in SD1 and SD2: nothing decides between them.
    t = kohya_modules("sd1")["lora_unet_down_blocks_0_resnets_0_conv1"]
    specs = {
        f"{t.name}.lora_down.weight": TensorSpec((4, 320, 3, 3), "F16"),
        f"{t.name}.lora_up.weight": TensorSpec((320, 4, 1, 1), "F16"),
        f"{t.name}.alpha": TensorSpec((), "F16"),
    }
    with pytest.raises(DetectionError) as err:
        detect_file(specs)
    assert "--arch" in err.value.hint
    # the recorded base model settles it
    assert detect_file(specs, {"ss_base_model_version": "sd_v2"}).arch == "sd2"
    assert detect_file(specs, arch="sd1").arch == "sd1"


def _peft_module(arch="sd1"):
    specs = adapter_layout(arch, "lora-peft")
    return {k: v for k, v in specs.items()}


def test_dora_is_reported():
    specs = _peft_module()
    mods = sorted({k.rsplit(".lora_", 1)[0] for k in specs})
    for m in mods[:3]:
        specs[f"{m}.lora_magnitude_vector"] = TensorSpec((specs[f"{m}.lora_B.weight"].shape[0],), "F16")
    report = inspect_source(SpecSource(specs), hashes=False)
    assert report.adapter.dora == 3
    assert report.adapter.family == "LoRA + DoRA"
    assert not report.adapter.unmapped


def test_locon_tucker_and_full_diff_modules():
    sd = kohya_modules("sd1")
    conv = sd["lora_unet_down_blocks_0_resnets_0_conv1"]
    lin = sd["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"]
    specs = {
        f"{conv.name}.lora_down.weight": TensorSpec((4, 320, 1, 1), "F16"),
        f"{conv.name}.lora_mid.weight": TensorSpec((4, 4, 3, 3), "F16"),
        f"{conv.name}.lora_up.weight": TensorSpec((320, 4, 1, 1), "F16"),
        f"{conv.name}.alpha": TensorSpec((), "F16"),
        f"{lin.name}.diff": TensorSpec((320, 320), "F16"),
    }
    report = inspect_source(SpecSource(specs), arch="sd1", hashes=False)
    a = report.adapter
    assert a.families == {"full": 1, "locon": 1}
    assert a.tucker == 1
    assert set(a.family.split(" + ")) == {"LoCon", "full diff"}
    assert (None, None, 1) in a.rank_alpha  # the full diff has no rank


def test_lycoris_shrunk_tables_detected():
    from support.synth import scaled_shape

    for naming in ("lycoris-loha", "lycoris-lokr"):
        specs = {k: TensorSpec(scaled_shape(s.shape, 64), s.dtype) for k, s in adapter_layout("sd1", naming).items()}
        report = inspect_source(SpecSource(specs), hashes=False)
        assert report.detection.arch == "sd1"
        assert report.adapter.family == EXPECTED_FAMILY[naming]


def test_other_files_are_named_plainly():
    prefix = "first_stage_model."
    vae = {k.removeprefix(prefix): s for k, s in checkpoint_layout("sd1").items() if k.startswith(prefix)}
    det = detect_file(vae)
    assert det.kind == "other" and "VAE" in det.description and det.arch is None
    det = detect_file({"emb_params": TensorSpec((8, 768), "F32")})
    assert det.kind == "other" and "embedding" in det.description and "8 vectors" in det.description
    det = detect_file({"clip_l": TensorSpec((2, 768), "F16"), "clip_g": TensorSpec((2, 1280), "F16")})
    assert det.kind == "other" and "embedding" in det.description
    det = detect_file({})
    assert det.kind == "other" and "no tensors" in det.description
    det = detect_file({"foo.weight": TensorSpec((3, 3), "F32")})
    assert det.kind == "other" and "unknown" in det.description


def test_adapter_for_another_model_is_shown_not_fatal():
    specs = {
        "lora_transformer_single_blocks_0_attn_to_q.lora_down.weight": TensorSpec((4, 3072), "BF16"),
        "lora_transformer_single_blocks_0_attn_to_q.lora_up.weight": TensorSpec((3072, 4), "BF16"),
    }
    report = inspect_source(SpecSource(specs), hashes=False)
    assert report.detection.kind == "adapter" and report.detection.arch is None
    assert sorted(report.adapter.unmapped) == sorted(specs)
    assert report.warnings


def test_unmapped_keys_listed_with_the_rest_mapped():
    specs = dict(adapter_layout("sd1", "lora-kohya"))
    extra = {"lora_unet_not_a_module.lora_down.weight": TensorSpec((4, 8), "F16"), "stray": TensorSpec((1,), "F16")}
    specs.update(extra)
    report = inspect_source(SpecSource(specs), hashes=False, keys=True)
    assert report.detection.arch == "sd1"
    assert set(report.adapter.unmapped) == set(extra)
    where = {k.key: k.maps_to for k in report.keys}
    assert {k for k, v in where.items() if v == "unmapped"} == set(extra)
    assert len(report.keys) == len(specs)
    t = kohya_modules("sd1")["lora_te_text_model_encoder_layers_0_mlp_fc1"]
    assert where[f"{t.name}.lora_up.weight"] == t.address


def test_stats_block_norm_is_alpha_scaled_frobenius_norm():
    t = kohya_modules("sd1")["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"]
    g = torch.Generator().manual_seed(0)
    down, up = torch.randn(2, 320, generator=g), torch.randn(320, 2, generator=g)
    values = {f"{t.name}.lora_down.weight": down, f"{t.name}.lora_up.weight": up, f"{t.name}.alpha": torch.tensor(1.0)}
    values[f"{t.name}.lora_up.weight"][0, 0] = float("nan")
    specs = {k: TensorSpec(tuple(v.shape), "F32") for k, v in values.items()}
    report = inspect_source(SpecSource(specs, values=values), arch="sd1", hashes=False, stats=True)
    assert [n.key for n in report.stats.nonfinite] == [f"{t.name}.lora_up.weight"]
    assert any("NaN" in w for w in report.warnings)
    up2 = up.clone()
    up2[0, 0] = 1.5
    values[f"{t.name}.lora_up.weight"] = up2
    report = inspect_source(SpecSource(specs, values=values), arch="sd1", hashes=False, stats=True)
    (block,) = report.stats.blocks
    assert block.block == "unet.input_blocks.1" and block.modules == 1
    expected = float(torch.linalg.matrix_norm(0.5 * (up2 @ down)))
    assert block.norm == pytest.approx(expected, rel=1e-5)
    assert report.stats.nonfinite == ()


@pytest.mark.parametrize(
    "name,family,dora,tucker",
    [
        ("sd15-loha", "LoHa", 0, 0),
        ("sd15-loha-tucker", "LoHa", 0, 50),
        ("sd15-lokr", "LoKr", 0, None),
        ("sd15-locon-tucker", "LoCon", 0, 50),
        ("sd15-dora", "LoCon + DoRA", 350, 0),
    ],
)
def test_lycoris_fixtures(fixtures, name, family, dora, tucker):
    from loratool.inspection import inspect_path

    path = fixtures / f"{name}.safetensors"
    if not path.exists():
        pytest.skip(f"{path.name} not generated")
    r = inspect_path(path, stats=True)
    assert (r.detection.arch, r.detection.naming) == ("sd1", "kohya")
    assert r.adapter.family == family and r.adapter.dora == dora and not r.adapter.unmapped
    if tucker is not None:
        assert r.adapter.tucker == tucker
    assert r.stats.blocks and all(b.norm > 0 for b in r.stats.blocks)
    assert sum(b.modules for b in r.stats.blocks) == r.adapter.modules


@pytest.mark.parametrize("arch", SD_ARCHES)  # a FLUX transformer file alone is the checkpoint
@pytest.mark.parametrize("naming", ["ldm", "diffusers"])
def test_single_component_files_are_other_with_arch(arch, naming):
    specs = checkpoint_specs(arch, naming, 64)
    unet = {k: s for k, s in specs.items() if k.startswith(("model.diffusion_model.", "unet/"))}
    bare = {k.split("/", 1)[-1].removeprefix("model.diffusion_model."): s for k, s in unet.items()}
    for part in (unet, bare):
        det = detect_file(part)
        assert (det.kind, det.other, det.arch, det.naming) == ("other", "unet", arch, naming)
        assert "UNet only" in det.description
    te = {k: s for k, s in specs.items() if k.startswith(("cond_stage_model.", "conditioner.embedders.0.", "text_encoder/"))}
    det = detect_file(te)
    assert (det.kind, det.other) == ("other", "text_encoder")
    # CLIP-L is the same in SD1 and SDXL (te1): the diffusers text encoder alone cannot tell them apart
    assert det.arch == (None if (naming, arch) in {("diffusers", "sd1"), ("diffusers", "sdxl")} else arch)


def test_checkpoint_without_vae_says_so():
    specs = {k: s for k, s in checkpoint_specs("sd1", "ldm", 64).items() if not k.startswith("first_stage_model.")}
    det = detect_file(specs)
    assert (det.kind, det.arch) == ("checkpoint", "sd1")
    assert any("no VAE weights" in e for e in det.evidence)


@pytest.mark.parametrize("name", ["sd15-lora-kohya", "sd15-lokr", "sd15-loha", "sd15-locon-tucker", "sd15-lora-peft"])
def test_closed_form_norms_agree_with_dense_delta(fixtures, name):
    """‖scale·ΔW‖² from Gram matrices / Kronecker norms equals the norm of the dense adapters.delta."""
    from loratool.adapters import delta, delta_norm_sq, load_adapter
    from loratool.io.source import open_file

    path = fixtures / f"{name}.safetensors"
    if not path.exists():
        pytest.skip(f"{path.name} not generated")
    with open_file(path) as src:
        adapter = load_adapter(src)
    for m in list(adapter.modules.values())[::7]:
        shape = m.target.target_shape
        dense = float(delta(m, shape).double().pow(2).sum())
        assert delta_norm_sq(m, shape) == pytest.approx(dense, rel=1e-4, abs=1e-12)
