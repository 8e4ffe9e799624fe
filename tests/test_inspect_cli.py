"""`loratool inspect` through loratool.cli.main: JSON schema stability, rich output, error exits."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from support.synth import make_lora

from loratool.cli import main
from loratool.io.output import save_tensors
from loratool.metadata import with_hashes

GOLDEN_TOP = {
    "adapter", "components", "detection", "file_size", "format", "hash_note", "hashes", "keys", "kind",
    "modelspec", "modules", "path", "schema", "stats", "tensors", "training", "triggers", "warnings",
}
GOLDEN_DETECTION = {"arch", "arch_label", "confidence", "description", "evidence", "forced", "naming", "other", "runner_up"}
GOLDEN_ADAPTER = {
    "by_component", "control", "dora_modules", "families", "family", "layers", "modules", "rank_alpha", "shape_config",
    "standard_shapes", "tucker_modules", "unmapped",
}
GOLDEN_HASHES = {
    "addnet", "addnet_short", "autov2", "legacy", "legacy_match", "model_match", "sha256", "stored_legacy", "stored_model",
}
GOLDEN_TRIGGERS = {"folders", "images", "tags", "trigger_phrase", "words"}
GOLDEN_TENSORS = {"count", "dtypes", "parameters"}
GOLDEN_STATS = {"blocks", "nonfinite", "tensors_checked"}


def run(capsys, *args) -> tuple[int, str, str]:
    code = main(["inspect", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_json_schema_is_stable(capsys, fixtures):
    code, out, _ = run(capsys, "--json", fixtures / "sd15-lora-kohya.safetensors", fixtures / "sd21-tiny.safetensors")
    assert code == 0
    assert "[bold" not in out and "\x1b[" not in out
    lora, ckpt = json.loads(out)
    for doc in (lora, ckpt):
        assert set(doc) == GOLDEN_TOP
        assert set(doc["detection"]) == GOLDEN_DETECTION
        assert set(doc["tensors"]) == GOLDEN_TENSORS
        assert set(doc["triggers"]) == GOLDEN_TRIGGERS
        assert doc["schema"] == "loratool.inspect/2"
        assert doc["keys"] is None and doc["stats"] is None and doc["modules"] is None
    assert set(lora["adapter"]) == GOLDEN_ADAPTER
    assert set(lora["hashes"]) == GOLDEN_HASHES
    assert (lora["kind"], lora["detection"]["arch"], lora["detection"]["naming"]) == ("adapter", "sd1", "kohya")
    assert lora["adapter"]["family"] == "LoCon"
    assert lora["adapter"]["rank_alpha"] == [{"alpha": 2.0, "modules": 350, "rank": 4}]
    assert lora["training"]["network_dim"] == "4"
    assert (ckpt["kind"], ckpt["detection"]["arch"], ckpt["detection"]["naming"]) == ("checkpoint", "sd2", "ldm")
    assert ckpt["hashes"] is None and ckpt["adapter"] is None
    # sorted keys, so the text itself is stable
    assert out == json.dumps(json.loads(out), indent=2, sort_keys=True) + "\n"


def test_json_with_keys_stats_and_hash(capsys, fixtures):
    code, out, _ = run(capsys, "--json", "--keys", "--stats", "--hash", fixtures / "sd15-tiny.safetensors")
    assert code == 0
    (doc,) = json.loads(out)
    assert set(doc["stats"]) == GOLDEN_STATS
    assert doc["stats"]["tensors_checked"] == doc["tensors"]["count"] == len(doc["keys"])
    assert all(k["maps_to"] != "unmapped" for k in doc["keys"])
    assert set(doc["keys"][0]) == {"dtype", "key", "maps_to", "shape"}
    assert doc["hashes"]["autov2"] == doc["hashes"]["sha256"][:10]


def test_rich_summary_shows_the_facts(capsys, tmp_path):
    tensors = make_lora("sd1", rank=4, alpha=2.0, seed=5)
    meta = {
        "ss_network_dim": "4",
        "ss_learning_rate": "0.0001",
        "ss_resolution": "(512, 512)",
        "ss_tag_frequency": json.dumps({"10_sks dog": {"sks": 10, "dog": 9}}),
        "ss_dataset_dirs": json.dumps({"10_sks dog": {"n_repeats": 10, "img_count": 10}}),
    }
    p = tmp_path / "trained.safetensors"
    save_tensors(p, tensors, with_hashes(tensors, meta))
    code, out, err = run(capsys, p)
    assert code == 0, err
    for text in ("SD1.x", "LoCon", "rank 4 / alpha 2", "512×512", "0.0001", "sks", "AutoV2", "matches"):
        assert text in out, text
    assert "does not match" not in out


def test_unmapped_keys_are_shown_and_exit_zero(capsys, tmp_path, fixtures):
    from safetensors.torch import load_file

    tensors = load_file(fixtures / "sd15-lora-peft.safetensors")
    tensors["unet.not_a_block.lora_A.weight"] = torch.zeros(4, 8)
    p = tmp_path / "extra.safetensors"
    save_tensors(p, tensors)
    code, out, _ = run(capsys, p)
    assert code == 0
    assert "unmapped keys (1)" in out and "unet.not_a_block.lora_A.weight" in out
    code, out, _ = run(capsys, "--json", "--keys", p)
    (doc,) = json.loads(out)
    assert doc["adapter"]["unmapped"] == ["unet.not_a_block.lora_A.weight"]
    assert len(doc["modules"]) == doc["adapter"]["modules"]
    golden = {"address", "alpha", "component", "dora", "family", "layer", "name", "rank", "rows", "tucker"}
    assert set(doc["modules"][0]) == golden
    assert [k["key"] for k in doc["keys"] if k["maps_to"] == "unmapped"] == ["unet.not_a_block.lora_A.weight"]


def _bad_inputs(tmp_path, fixtures):
    src = (fixtures / "sd15-lora-kohya.safetensors").read_bytes()
    (tmp_path / "empty.safetensors").write_bytes(b"")
    (tmp_path / "truncated.safetensors").write_bytes(src[: len(src) // 2])
    (tmp_path / "short-header.safetensors").write_bytes(src[:5000])
    (tmp_path / "corrupt.safetensors").write_bytes(struct.pack("<Q", 12) + b"{not json!!}" + b"\0" * 64)
    (tmp_path / "notes.txt").write_text("hello, not a model\n")
    (tmp_path / "folder" / "unet").mkdir(parents=True)
    return ["empty.safetensors", "truncated.safetensors", "short-header.safetensors", "corrupt.safetensors", "notes.txt",
            "folder", "missing.safetensors"]


def test_bad_input_is_one_error_line_exit_2(capsys, tmp_path, fixtures):
    for name in _bad_inputs(tmp_path, fixtures):
        code, out, err = run(capsys, tmp_path / name)
        assert code == 2, name
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert sum(ln.startswith("error:") for ln in lines) == 1, (name, err)
        assert lines[0].startswith("error:") and name in lines[0]
        assert any(ln.startswith("hint:") for ln in lines)
        assert "Traceback" not in err and out == ""


def test_ambiguous_adapter_exit_2_names_arch(capsys, tmp_path):
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    p = tmp_path / "amb.safetensors"
    save_tensors(p, {f"{name}.lora_down.weight": torch.zeros(4, 320, 3, 3), f"{name}.lora_up.weight": torch.zeros(320, 4, 1, 1)})
    code, _, err = run(capsys, p)
    assert code == 2 and "--arch" in err
    code, out, _ = run(capsys, "--arch", "sd2", "--json", p)
    assert code == 0 and json.loads(out)[0]["detection"]["forced"] is True


def test_diffusers_folder_and_subprocess(capsys, tmp_path, fixtures):
    import subprocess
    import sys

    from support.synth import checkpoint_specs, random_tensor

    specs = checkpoint_specs("sd1", "diffusers", 64)
    for comp in ("unet", "text_encoder", "vae"):
        (tmp_path / "pipe" / comp).mkdir(parents=True)
        part = {k.split("/", 1)[1]: random_tensor(k, s, 0) for k, s in specs.items() if k.startswith(comp + "/")}
        save_tensors(tmp_path / "pipe" / comp / "diffusion_pytorch_model.safetensors", part)
    code, out, err = run(capsys, "--json", tmp_path / "pipe")
    assert code == 0, err
    (doc,) = json.loads(out)
    assert (doc["kind"], doc["detection"]["arch"], doc["detection"]["naming"]) == ("checkpoint", "sd1", "diffusers")
    assert doc["components"] == {"unet": 686, "text_encoder": 196, "vae": 248}
    bad = tmp_path / "bad.safetensors"
    shutil.copy(fixtures / "sd15-lora-kohya.safetensors", bad)
    with open(bad, "r+b") as fh:
        fh.truncate(100)
    r = subprocess.run([sys.executable, "-m", "loratool", "inspect", str(bad)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr


@pytest.mark.parametrize("flag", ["--help"])
def test_help(capsys, flag):
    assert main(["inspect", flag]) == 0
    assert "--arch" in capsys.readouterr().out


def test_doc_examples_run(capsys):
    """Every `$ loratool inspect ...` line in docs/inspect.md runs on the fixtures and exits 0."""
    import shlex
    from pathlib import Path

    doc = Path(__file__).resolve().parent.parent / "docs" / "inspect.md"
    lines = [ln[2:].strip() for ln in doc.read_text().splitlines() if ln.startswith("$ loratool inspect")]
    assert len(lines) >= 5
    root = doc.parent.parent
    for line in lines:
        args = [str(root / a) if a.startswith("fixtures/") else a for a in shlex.split(line)[1:]]
        assert main(args) == 0, line
        out = capsys.readouterr().out
        assert out.strip(), line


def test_pickle_checkpoint(capsys, tmp_path):
    from support.synth import make_checkpoint

    p = tmp_path / "model.ckpt"
    torch.save({"state_dict": make_checkpoint("sd1", seed=3)}, p)
    code, out, err = run(capsys, "--json", "--hash", "--stats", p)
    assert code == 0, err
    (doc,) = json.loads(out)
    assert (doc["format"], doc["kind"], doc["detection"]["arch"]) == ("pickle", "checkpoint", "sd1")
    assert doc["hashes"]["addnet"] is None  # the addnet hash is defined for safetensors only
    assert doc["stats"]["tensors_checked"] == doc["tensors"]["count"] and doc["stats"]["nonfinite"] == []
