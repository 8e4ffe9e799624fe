"""`loratool demo` runs every main job end to end on the bundled tiny files and exits 0."""

from __future__ import annotations

from loratool.cli import main


def test_demo_runs_every_step(tmp_path, capsys):
    work = tmp_path / "demo"
    assert main(["demo", "--workdir", str(work)]) == 0
    out = capsys.readouterr().out
    for title in ("train a LoRA", "inspect it", "sample with it", "merge it into the base", "resize it to rank 2",
                  "extract it back from the merge"):
        assert f"{title}: ok" in out
    assert "failed" not in out
    for name in ("sks_blob.safetensors", "sample.png", "merged.safetensors", "sks_blob_r2.safetensors", "extracted.safetensors"):
        assert (work / name).is_file()
