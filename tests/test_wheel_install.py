"""`pip install loratool` alone runs every command, `demo` included: build the wheel, install it into a
fresh virtual environment, and run the demo from a folder outside the checkout.

The venv sees the already-installed dependencies (torch, safetensors, ...) through
``--system-site-packages``, so nothing is downloaded; loratool itself must come from the wheel.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(600)
def test_wheel_installs_and_runs_demo_outside_the_checkout(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(ROOT)],
                   check=True, capture_output=True, cwd=tmp_path)
    wheel = next(dist.glob("loratool-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "loratool/assets/tiny-sd1.safetensors" in names and "loratool/assets/clip-merges.txt.gz" in names
    assert any(n.startswith("loratool/assets/tiny_dataset/img/") for n in names)
    assert not any(n.startswith(("fixtures/", "tests/")) for n in names)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    where = subprocess.run([str(py), "-c", "import loratool; print(loratool.__file__)"], check=True, capture_output=True,
                           text=True, cwd=elsewhere, env=env).stdout.strip()
    assert Path(where).resolve().is_relative_to(venv.resolve()), where  # the wheel's copy, not the checkout
    demo = subprocess.run([str(venv / "bin" / "loratool"), "demo"], capture_output=True, text=True, cwd=elsewhere, env=env,
                          timeout=540)
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-2000:]
    assert "failed" not in demo.stdout
