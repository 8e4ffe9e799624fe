"""The faults a new user hit (issue #11): every one has a test that fails without its fix."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

from loratool.cli import main
from loratool.io.output import save_tensors
from loratool.io.source import open_file

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "fixtures"
TINY = ROOT / "loratool" / "assets" / "tiny-sd1.safetensors"


def _is_torch_zip(path: Path) -> bool:
    return zipfile.is_zipfile(path) and any(n.endswith("data.pkl") for n in zipfile.ZipFile(path).namelist())


def _torch_load(path: Path) -> dict:
    obj = torch.load(path, weights_only=True)
    return obj.get("state_dict", obj)


# ----------------------------------------------------------------------------- 4. the extension names the container


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_every_command_writes_the_container_its_extension_names(tmp_path, suffix):
    lora, ckpt = FIX / "sd15-lora-kohya.safetensors", FIX / "sd15-tiny.safetensors"
    jobs = {
        "merge": ["merge", str(ckpt), f"{lora}:0.5", "-o"],
        "lora-merge": ["merge", str(lora), str(FIX / "sd15-lora-peft.safetensors"), "-o"],
        "resize": ["resize", str(lora), "--rank", "2", "-o"],
        "extract": ["extract", str(tmp_path / "merged.safetensors"), str(ckpt), "--rank", "2", "-o"],
        "train": ["train", "--data", str(ROOT / "loratool/assets/tiny_dataset/img"), "--steps", "1", "--resolution", "64",
                  "-o"],
    }
    assert main(["merge", str(ckpt), f"{lora}:0.5", "-o", str(tmp_path / "merged.safetensors")]) == 0
    for name, argv in jobs.items():
        out = tmp_path / f"{name}{suffix}"
        assert main([*argv, str(out)]) == 0, name
        assert _is_torch_zip(out), name
        loaded = _torch_load(out)
        assert loaded and all(isinstance(v, torch.Tensor) for v in loaded.values()), name
        ours = open_file(out)  # and our own reader agrees
        assert set(ours.keys()) == set(loaded), name


def test_merge_to_safetensors_and_ckpt_hold_the_same_tensors(tmp_path):
    ckpt, lora = FIX / "sd15-tiny.safetensors", FIX / "sd15-lora-kohya.safetensors"
    assert main(["merge", str(ckpt), f"{lora}:0.5", "-o", str(tmp_path / "m.safetensors")]) == 0
    assert main(["merge", str(ckpt), f"{lora}:0.5", "-o", str(tmp_path / "m.ckpt")]) == 0
    a, b = open_file(tmp_path / "m.safetensors"), _torch_load(tmp_path / "m.ckpt")
    assert set(a.keys()) == set(b)
    assert all(torch.equal(a.get(k), b[k]) for k in b)


@pytest.mark.parametrize("name", ["outnoext", "out.txt"])
def test_unknown_output_extension_is_refused(tmp_path, name, capsys):
    out = tmp_path / name
    rc = main(["merge", str(FIX / "sd15-tiny.safetensors"), str(FIX / "sd15-lora-kohya.safetensors"), "-o", str(out)])
    assert rc == 2 and not out.exists()
    assert "extension" in capsys.readouterr().err
    assert main(["resize", str(FIX / "sd15-lora-kohya.safetensors"), "--rank", "2", "-o", str(out)]) == 2


# ----------------------------------------------------------------------------- 5. the current folder or a parent


@pytest.mark.parametrize("target", [".", "..", "./"])
def test_output_that_is_the_current_folder_or_a_parent_is_refused(tmp_path, monkeypatch, capsys, target):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    (work / "keep.txt").write_text("x")
    rc = main(["convert", str(FIX / "sd15-tiny.safetensors"), target, "--to", "diffusers", "--force"])
    err = capsys.readouterr().err
    assert rc == 2 and "current folder" in err and "Traceback" not in err
    assert (work / "keep.txt").read_text() == "x"


def test_output_folder_holding_an_input_is_refused(tmp_path, capsys):
    folder = tmp_path / "models"
    folder.mkdir()
    src = folder / "m.safetensors"
    src.write_bytes((FIX / "sd15-tiny.safetensors").read_bytes())
    assert main(["convert", str(src), str(folder), "--to", "diffusers", "--force"]) == 2
    assert src.is_file() and "contains the input" in capsys.readouterr().err


# ----------------------------------------------------------------------------- 6. never delete what we did not write


def test_force_refuses_a_foreign_non_empty_folder(tmp_path, capsys):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    save_tensors(precious / "my-lora.safetensors", {"a": torch.ones(2)})
    assert main(["convert", str(FIX / "sd15-tiny.safetensors"), str(precious), "--to", "diffusers", "--force"]) == 2
    assert "never deletes" in capsys.readouterr().err
    assert sorted(p.name for p in precious.iterdir()) == ["my-lora.safetensors", "notes.txt"]


def test_force_over_a_diffusers_folder_keeps_files_we_did_not_write(tmp_path):
    out = tmp_path / "pipe"
    assert main(["convert", str(FIX / "sd15-tiny.safetensors"), str(out), "--to", "diffusers"]) == 0
    (out / "README.txt").write_text("notes")
    (out / "unet" / "extra.safetensors").write_bytes(b"not ours")
    old_unet = (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert main(["convert", str(FIX / "sd15-tiny.safetensors"), str(out), "--to", "diffusers", "--force", "--dtype", "fp32"]) == 0
    assert (out / "README.txt").read_text() == "notes"
    assert (out / "unet" / "extra.safetensors").read_bytes() == b"not ours"
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() != old_unet  # replaced: it is ours
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_merge_into_a_diffusers_folder_is_atomic(tmp_path, monkeypatch):
    base = tmp_path / "base"
    assert main(["convert", str(FIX / "sd15-tiny.safetensors"), str(base), "--to", "diffusers"]) == 0
    from loratool.io.writer import SafetensorsWriter

    calls = {"n": 0}
    real = SafetensorsWriter.write

    def failing(self, key, tensor):
        calls["n"] += 1
        if calls["n"] == 50:
            raise RuntimeError("crash in the middle")
        return real(self, key, tensor)

    monkeypatch.setattr(SafetensorsWriter, "write", failing)
    out = tmp_path / "merged"
    assert main(["merge", str(base), str(FIX / "sd15-lora-kohya.safetensors"), "-o", str(out)]) == 1
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["base"]


# ----------------------------------------------------------------------------- 7. SIGTERM / SIGHUP


_KILL_AFTER = textwrap.dedent(
    """
    import os, signal, sys
    from loratool.io import writer
    from loratool.cli import main
    real, n = writer.SafetensorsWriter.write, [0]
    def write(self, key, tensor):
        n[0] += 1
        if n[0] == 20:
            os.kill(os.getpid(), getattr(signal, sys.argv[1]))
        return real(self, key, tensor)
    writer.SafetensorsWriter.write = write
    sys.exit(main(sys.argv[2:]))
    """
)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
@pytest.mark.parametrize("layout", ["file", "folder"])
def test_term_and_hup_clean_up_like_sigint(tmp_path, sig, layout):
    out = tmp_path / ("out.safetensors" if layout == "file" else "out")
    argv = ["convert", str(FIX / "sd15-tiny.safetensors"), str(out), "--dtype", "fp32"]
    if layout == "folder":
        argv += ["--to", "diffusers"]
    proc = subprocess.run([sys.executable, "-c", _KILL_AFTER, sig, *argv], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 128 + getattr(signal, sig), proc.stderr
    assert "Terminated" in proc.stderr and "Traceback" not in proc.stderr
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- 8. one clamp rule


def test_merge_dtype_fp16_clamps_like_convert(tmp_path):
    base = {"model.diffusion_model.x": torch.tensor([1.0, 70000.0, -1e6, float("nan")])}
    src = save_tensors(tmp_path / "big.safetensors", base)
    assert main(["convert", str(src), str(tmp_path / "c.safetensors"), "--dtype", "fp16"]) == 0
    converted = open_file(tmp_path / "c.safetensors").get("model.diffusion_model.x")
    assert converted.tolist()[:3] == [1.0, 65504.0, -65504.0]

    from loratool.io.source import TensorSpec
    from loratool.io.writer import SafetensorsWriter

    with SafetensorsWriter(tmp_path / "w.safetensors", {"x": TensorSpec((4,), "F16")}) as w:
        w.write("x", base["model.diffusion_model.x"])
        assert w.clamped == {"x": 2}
        w.finalize()
    written = open_file(tmp_path / "w.safetensors").get("x")
    assert written.tolist()[:3] == [1.0, 65504.0, -65504.0] and torch.isnan(written[3])


def test_checkpoint_merge_with_dtype_fp16_never_writes_inf(tmp_path):
    src = open_file(FIX / "sd15-tiny.safetensors")
    tensors = {k: src.get(k) for k in src.keys()}
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    tensors[key] = tensors[key].float() * 1e8  # far beyond fp16 (65504)
    big = save_tensors(tmp_path / "big.safetensors", tensors)
    out = tmp_path / "m.safetensors"
    assert main(["merge", str(big), str(FIX / "sd15-lora-kohya.safetensors"), "-o", str(out), "--dtype", "fp16"]) == 0
    merged = open_file(out).get(key)
    assert merged.dtype == torch.float16 and bool(torch.isfinite(merged).all())
    assert float(merged.float().abs().max()) == 65504.0


# ----------------------------------------------------------------------------- 9. alphas stored exactly


def test_train_and_resize_store_non_integer_alphas_exactly(tmp_path):
    out = tmp_path / "a.safetensors"
    assert main(["train", "--data", str(ROOT / "loratool/assets/tiny_dataset/img"), "--steps", "1", "--resolution", "64",
                 "--alpha", "0.3", "--rank", "4", "-o", str(out)]) == 0
    src = open_file(out)
    alphas = [src.get(k) for k in src.keys() if k.endswith(".alpha")]
    assert alphas and all(float(a.double()) == 0.3 for a in alphas)  # not 0.2998 (fp16)
    assert all(src.get(k).dtype == torch.float16 for k in src.keys() if k.endswith(".lora_up.weight"))
    resized = tmp_path / "r.safetensors"
    assert main(["resize", str(out), "--rank", "3", "-o", str(resized)]) == 0
    r = open_file(resized)
    for k in r.keys():
        if k.endswith(".alpha"):
            want = 0.3 * 3 / 4  # alpha' = alpha·k/r keeps the scale
            assert abs(float(r.get(k).double()) - want) < 1e-7, k


# ----------------------------------------------------------------------------- 10. dates honour SOURCE_DATE_EPOCH


def test_extract_is_byte_identical_with_source_date_epoch(tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    merged = tmp_path / "m.safetensors"
    assert main(["merge", str(FIX / "sd15-tiny.safetensors"), str(FIX / "sd15-lora-kohya.safetensors"), "-o", str(merged)]) == 0
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert main(["extract", str(merged), str(FIX / "sd15-tiny.safetensors"), "--rank", "2", "-o", str(a)]) == 0
    monkeypatch.setattr("time.time", lambda: 1800000000.0)  # a later wall clock must not show
    assert main(["extract", str(merged), str(FIX / "sd15-tiny.safetensors"), "--rank", "2", "-o", str(b)]) == 0
    assert a.read_bytes() == b.read_bytes()
    assert open_file(a).metadata["modelspec.date"] == "2023-11-14T22:13:20"


# ----------------------------------------------------------------------------- 14. one spelling per option


def test_every_command_spells_shared_options_the_same():
    from loratool.cli import COMMANDS, cli
    from loratool.dtypes import CHOICES

    for name in COMMANDS:
        command = cli.get_command(None, name)
        opts = {o.name: o for o in command.params}
        if "out" in opts and name != "convert":
            assert "--output" in opts["out"].opts and "-o" in opts["out"].opts, name
        if "device" in opts:
            assert opts["device"].default == "auto" and list(opts["device"].type.choices) == ["auto", "cpu", "cuda"], name
        if "dtype" in opts:
            assert tuple(opts["dtype"].type.choices) == CHOICES, name


def test_every_json_report_has_a_schema(tmp_path, capsys):
    lora, ckpt = FIX / "sd15-lora-kohya.safetensors", FIX / "sd15-tiny.safetensors"
    runs = [
        ["inspect", "--json", str(lora)],
        ["convert", str(lora), str(tmp_path / "p.safetensors"), "--to", "peft", "--json"],
        ["merge", str(ckpt), str(lora), "--dry-run", "--json"],
        ["merge", str(ckpt), str(lora), "-o", str(tmp_path / "m.safetensors"), "--json"],
        ["merge", str(lora), str(FIX / "sd15-lora-peft.safetensors"), "-o", str(tmp_path / "l.safetensors"), "--json"],
        ["resize", str(lora), "--rank", "2", "-o", str(tmp_path / "r.safetensors"), "--json"],
        ["extract", str(tmp_path / "m.safetensors"), str(ckpt), "--rank", "2", "-o", str(tmp_path / "e.safetensors"), "--json"],
    ]
    for argv in runs:
        capsys.readouterr()
        assert main(argv) == 0, argv
        data = json.loads(capsys.readouterr().out)
        for item in data if isinstance(data, list) else [data]:
            assert item["schema"].startswith("loratool."), argv


def test_dry_run_explains_its_columns(capsys):
    assert main(["merge", str(FIX / "sd15-tiny.safetensors"), str(FIX / "sd15-lora-kohya.safetensors"), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("adapter 1:") and "ADAPTER#" in lines[1]


def test_hashes_are_never_wrapped_when_piped():
    proc = subprocess.run([sys.executable, "-m", "loratool", "inspect", str(FIX / "sd15-lora-kohya.safetensors")],
                          capture_output=True, text=True, env={**os.environ, "COLUMNS": "60", "PYTHONPATH": str(ROOT)})
    sha = next(line for line in proc.stdout.splitlines() if line.strip().startswith("sha256"))
    assert len(sha.split()[-1]) == 64


def test_inspect_reports_good_files_before_failing(capsys):
    rc = main(["inspect", str(FIX / "sd15-lora-kohya.safetensors"), "missing.safetensors"])
    captured = capsys.readouterr()
    assert rc == 2 and "sd15-lora-kohya.safetensors" in captured.out and "missing.safetensors" in captured.err


def test_convert_to_lora_says_refactoring_once(tmp_path, capsys):
    assert main(["convert", str(FIX / "sd15-loha.safetensors"), str(tmp_path / "l.safetensors"), "--to", "lora"]) == 0
    assert capsys.readouterr().out.count("refactored") == 1


# ----------------------------------------------------------------------------- 15. errors


def test_truncated_ckpt_is_called_truncated(tmp_path, capsys):
    full = tmp_path / "full.ckpt"
    torch.save({"state_dict": {"a": torch.zeros(1000)}}, full)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    assert main(["inspect", str(cut)]) == 2
    assert "truncated" in capsys.readouterr().err


def test_merge_refuses_a_ratio_on_the_base(capsys):
    rc = main(["merge", f"{FIX / 'sd15-tiny.safetensors'}:0.5", str(FIX / "sd15-lora-kohya.safetensors"), "--dry-run"])
    assert rc == 2 and "takes no ratio" in capsys.readouterr().err


def test_a_bug_is_not_a_user_error(monkeypatch, capsys):
    import loratool.ops.resize as resize

    def broken(*a, **k):
        raise ZeroDivisionError("oops")

    monkeypatch.setattr(resize, "resize_lora", broken)
    args = ["resize", str(FIX / "sd15-lora-kohya.safetensors"), "--rank", "2", "-o", "never.safetensors"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "internal error, please report" in err and "Traceback" not in err
    assert main(["--debug", *args]) == 1
    assert "Traceback" in capsys.readouterr().err
