"""Bad inputs through the CLI: exit code 2, one `error:` line (plus a hint), no traceback, no output file.
And determinism: the same command twice writes byte-identical files."""

import os
import shutil

import pytest
import torch
from support.synth import make_lora

from loratool.cli import main
from loratool.io.output import save_tensors


def _lora(tmp_path, name, edit):
    t = make_lora("sd1", seed=9)
    edit(t)
    return save_tensors(tmp_path / name, t, {"ss_base_model_version": "sd_v1"})


def _nan(t):
    k = next(k for k in t if k.endswith("lora_up.weight"))
    t[k] = t[k].clone()
    t[k][0, 0] = float("nan")


def _zero_rank(t):
    k = next(k for k in t if k.endswith("lora_down.weight") and t[k].dim() == 2)
    up = k.replace("lora_down", "lora_up")
    t[k] = t[k][:0]
    t[up] = t[up][:, :0]


def _rank_mismatch(t):
    k = next(k for k in t if k.endswith("lora_down.weight") and t[k].dim() == 2)
    t[k] = torch.cat([t[k], t[k]])


CASES = {
    "nan values": (lambda tp, fx: ["merge", str(fx / "sd15-tiny.safetensors"), str(_lora(tp, "nan.safetensors", _nan))],
                   "NaN"),
    "zero rank": (lambda tp, fx: ["merge", str(fx / "sd15-tiny.safetensors"), str(_lora(tp, "z.safetensors", _zero_rank))],
                  "rank 0"),
    "up/down ranks differ": (
        lambda tp, fx: ["merge", str(fx / "sd15-tiny.safetensors"), str(_lora(tp, "m.safetensors", _rank_mismatch))], "rank"),
    "LoRA for another architecture": (
        lambda tp, fx: ["merge", str(fx / "sd15-tiny.safetensors"), str(fx / "sdxl-lora-kohya.safetensors")], "SDXL"),
    "ratio string a:b:c": (lambda tp, fx: ["merge", str(fx / "sd15-tiny.safetensors"), "a:b:c"], "a:b:c"),
    "truncated base": (lambda tp, fx: ["merge", str(_truncated(tp, fx)), str(fx / "sd15-lora-kohya.safetensors")], "truncated"),
    "resize of a broken LoRA": (
        lambda tp, fx: ["resize", str(_lora(tp, "m.safetensors", _rank_mismatch)), "--rank", "2"], "rank"),
    "convert of a broken LoRA": (lambda tp, fx: ["convert", str(_lora(tp, "n.safetensors", _zero_rank)), "--to", "peft"],
                                 "rank 0"),
}


def _truncated(tmp_path, fixtures):
    data = (fixtures / "sd15-tiny.safetensors").read_bytes()
    path = tmp_path / "trunc.safetensors"
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_exits_2_with_one_error_line(tmp_path, fixtures, capfd, case):
    make_args, needle = CASES[case]
    args = make_args(tmp_path, fixtures)
    out = tmp_path / "out" / "result.safetensors"
    out.parent.mkdir()
    if args[0] == "convert":
        args = [args[0], args[1], str(out), *args[2:]]
    else:
        args += ["-o", str(out)]
    before = sorted(os.listdir(tmp_path))
    assert main(args) == 2
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert sum(line.startswith("error:") for line in lines) == 1, err
    assert needle.lower() in err.lower(), err
    assert "Traceback" not in err
    assert os.listdir(out.parent) == []
    assert sorted(os.listdir(tmp_path)) == before


def test_nonfinite_merge_allowed_with_flag(tmp_path, fixtures):
    lora = _lora(tmp_path, "nan.safetensors", _nan)
    out = tmp_path / "merged.safetensors"
    assert main(["merge", str(fixtures / "sd15-tiny.safetensors"), str(lora), "-o", str(out), "--allow-nonfinite"]) == 0
    assert out.exists()


def test_output_equal_to_input_is_refused_and_input_kept(tmp_path, fixtures):
    base = tmp_path / "base.safetensors"
    shutil.copy(fixtures / "sd15-tiny.safetensors", base)
    before = base.read_bytes()
    args = ["merge", str(base), str(fixtures / "sd15-lora-kohya.safetensors"), "-o", str(base), "--force"]
    assert main(args) == 2
    assert base.read_bytes() == before


RUNS = {
    "merge lora": lambda fx, o: ["merge", str(fx / "sd15-tiny.safetensors"), f"{fx / 'sd15-lora-kohya.safetensors'}:0.7",
                                 "-o", o],
    "merge": lambda fx, o: ["merge", str(fx / "sd15-tiny.safetensors"), f"{fx / 'sd15-loha.safetensors'}:0.7", "-o", o],
    "merge loras": lambda fx, o: ["merge", str(fx / "sd15-lora-kohya.safetensors"), str(fx / "sd15-lokr.safetensors"), "-o", o],
    "convert": lambda fx, o: ["convert", str(fx / "sdxl-lora-kohya.safetensors"), o, "--to", "peft"],
    "convert dtype": lambda fx, o: ["convert", str(fx / "sd21-tiny.safetensors"), o, "--dtype", "bf16"],
    "resize": lambda fx, o: ["resize", str(fx / "sd21-lora-kohya.safetensors"), "--rank", "2", "-o", o],
    "extract": lambda fx, o: ["extract", str(fx / "tuned.safetensors"), str(fx / "sd15-tiny.safetensors"), "--rank", "2",
                              "-o", o],
}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_same_command_twice_is_byte_identical(tmp_path, fixtures, name, monkeypatch):
    """A plain-LoRA merge also with another thread count: its row blocks (made small here) split over 1,
    then 3 threads (SVD-based commands may round differently on other thread counts, as LAPACK does)."""
    import loratool.ops.merge

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    monkeypatch.setattr(loratool.ops.merge, "_BLOCK_BYTES", 4096)
    if name == "extract":  # a fine-tune of the fixture base: base + a LoRA, merged
        tuned_dir = tmp_path / "fx"
        tuned_dir.mkdir()
        (tuned_dir / "sd15-tiny.safetensors").symlink_to(fixtures / "sd15-tiny.safetensors")
        merge = ["merge", str(fixtures / "sd15-tiny.safetensors"), str(fixtures / "sd15-lora-kohya.safetensors")]
        assert main([*merge, "-o", str(tuned_dir / "tuned.safetensors"), "--json"]) == 0
        fixtures = tuned_dir
    outs = []
    for i in range(2):
        if name == "merge lora":
            monkeypatch.setenv("LORATOOL_THREADS", str(1 + 2 * i))
        out = tmp_path / f"out{i}.safetensors"
        args = RUNS[name](fixtures, str(out))
        assert main([*args, "--json"]) == 0
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


def test_process_exit_after_torch_keeps_output_exit_code_and_freezes_torch(tmp_path, fixtures):
    """`python -m loratool` leaves with os._exit once torch is loaded (no 0.8 s interpreter teardown):
    piped stdout still arrives whole, the output file is complete, and bad input still exits 2.
    The import hook froze torch's objects out of the garbage collector's full passes."""
    import json
    import subprocess
    import sys

    out = tmp_path / "m.safetensors"
    args = [sys.executable, "-m", "loratool", "merge", str(fixtures / "sd15-tiny.safetensors"),
            str(fixtures / "sd15-lora-kohya.safetensors") + ":0.5", "-o", str(out), "--json"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["schema"].startswith("loratool.merge")
    from loratool.io.source import open_file

    assert len(open_file(out).keys()) == len(open_file(fixtures / "sd15-tiny.safetensors").keys())
    bad = subprocess.run(args[:-3] + ["-o", str(out), "--json"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.startswith("error:"), bad.stderr  # exists, no --force
    code = ("import gc, sys\nfrom loratool.cli import main\n"
            f"rc = main(['resize', {str(fixtures / 'sd15-lora-kohya.safetensors')!r}, '--rank', '2', "
            f"'-o', {str(tmp_path / 'r.safetensors')!r}])\nprint(rc, gc.get_freeze_count() > 10000)\n")
    last = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300).stdout.splitlines()[-1]
    assert last.split() == ["0", "True"]


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="a glibc malloc setting")
@pytest.mark.parametrize("env", ["", "MALLOC_MMAP_MAX_"])
def test_the_cli_serves_large_blocks_from_the_reused_heap(env):
    """After the CLI's start, a 64 MiB block comes from malloc's heap, not a fresh mmap (glibc's mallinfo2
    counts mmapped bytes in hblkhd), so freed output buffers are reused; a user's own MALLOC_MMAP_MAX_ wins."""
    import subprocess
    import sys

    code = ("import ctypes\nfrom loratool.cli import main\nmain(['--help'])\n"
            "class Info(ctypes.Structure):\n    _fields_ = [(n, ctypes.c_size_t) for n in "
            "('arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks', 'fsmblks', 'uordblks', 'fordblks', 'keepcost')]\n"
            "libc = ctypes.CDLL(None)\nlibc.mallinfo2.restype = Info\nlibc.malloc.restype = ctypes.c_void_p\n"
            "before = libc.mallinfo2().hblkhd\np = libc.malloc(64 << 20)\nprint(libc.mallinfo2().hblkhd - before)\n")
    extra = {env: "65536"} if env else {}
    env_vars = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={**env_vars, **extra})
    mapped = int(r.stdout.splitlines()[-1])
    assert (mapped >= 64 << 20) if env else mapped == 0, r.stdout
