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
