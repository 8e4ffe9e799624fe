"""Header-only work must not pay for importing torch (inspect of a 7 GB file answers in well under a second)."""

import subprocess
import sys


def test_inspect_checkpoint_does_not_import_torch(fixtures):
    code = (
        "import sys\n"
        "from loratool.cli import main\n"
        f"rc = main(['inspect', {str(fixtures / 'sdxl-tiny.safetensors')!r}, '--json'])\n"
        "assert rc == 0, rc\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"


def test_file_operations_never_import_the_trainer(fixtures, tmp_path):
    """convert, merge, resize, extract and the diffusers folder writer run without loratool.train."""
    lora, ckpt = fixtures / "sd15-lora-kohya.safetensors", fixtures / "sd15-tiny.safetensors"
    code = (
        "import sys\n"
        "from loratool.cli import main\n"
        f"assert main(['convert', {str(ckpt)!r}, {str(tmp_path / 'f')!r}, '--to', 'diffusers']) == 0\n"
        f"assert main(['merge', {str(ckpt)!r}, {str(lora)!r}, '-o', {str(tmp_path / 'm.safetensors')!r}]) == 0\n"
        f"assert main(['resize', {str(lora)!r}, '--rank', '2', '-o', {str(tmp_path / 'r.safetensors')!r}]) == 0\n"
        f"assert main(['extract', {str(tmp_path / 'm.safetensors')!r}, {str(ckpt)!r}, '--rank', '2', "
        f"'-o', {str(tmp_path / 'e.safetensors')!r}]) == 0\n"
        "print(sorted(m for m in sys.modules if m.startswith('loratool.train')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
