"""Faults during writing: nothing lost, no corrupt file, no temp file left behind."""

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from loratool.errors import OutputError
from loratool.io.output import save_tensors
from loratool.io.source import TensorSpec
from loratool.io.writer import SafetensorsWriter


def test_out_of_space_mid_write_leaves_nothing(tmp_path):
    out = tmp_path / "out.safetensors"
    specs = {f"t{i}": TensorSpec((1024,), "F32") for i in range(4)}
    w = SafetensorsWriter(out, specs)
    w.write("t0", torch.zeros(1024))
    w._fh = _FailingFile(w._fh)  # the disk fills up from here on
    with pytest.raises(OutputError, match="No space left"):
        w.write("t1", torch.zeros(1024))
    assert os.listdir(tmp_path) == []


class _FailingFile:
    def __init__(self, fh):
        self._fh = fh

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_existing_output_is_untouched_after_failure(tmp_path):
    out = save_tensors(tmp_path / "out.safetensors", {"a": torch.ones(2)})
    before = out.read_bytes()
    specs = {"a": TensorSpec((2,), "F32"), "b": TensorSpec((2,), "F32")}
    with pytest.raises(RuntimeError):
        with SafetensorsWriter(out, specs, force=True) as w:
            w.write("a", torch.zeros(2))
            raise RuntimeError("crash before the end")
    assert out.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["out.safetensors"]


def test_sigint_mid_write_leaves_no_output(tmp_path):
    script = textwrap.dedent(
        f"""
        import signal, sys, time, torch
        signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored (`cmd &`)
        from loratool.io.source import TensorSpec
        from loratool.io.writer import SafetensorsWriter
        specs = {{f"t{{i}}": TensorSpec((256,), "F32") for i in range(1000)}}
        with SafetensorsWriter({str(tmp_path / "out.safetensors")!r}, specs) as w:
            for i in range(1000):
                w.write(f"t{{i}}", torch.zeros(256))
                if i == 5:
                    print("writing", flush=True)
                time.sleep(0.01)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"writing"
    time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)
    assert proc.returncode != 0
    assert os.listdir(tmp_path) == []


def test_cli_interrupt_exit_code(monkeypatch):
    from loratool import cli

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.cli, "main", boom)
    assert cli.main(["inspect", "x"]) == 130
