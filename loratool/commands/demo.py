"""`loratool demo`: train → inspect → sample → merge → resize → extract on the bundled tiny files."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import click


def demo_steps(work: Path, base: Path, data: Path) -> list[tuple[str, list[str]]]:
    """(title, argv) of each step; every output lands in ``work``."""
    base = str(base)
    lora = str(work / "sks_blob.safetensors")
    return [
        ("train a LoRA", ["train", "--base", base, "--data", str(data / "img"), "--reg-data", str(data / "reg"),
                          "-o", lora, "--rank", "4", "--alpha", "4", "--lr", "1e-3", "--steps", "16", "--resolution", "64"]),
        ("inspect it", ["inspect", lora]),
        ("sample with it", ["sample", "--base", base, "--prompt", "sks blob, red circle <lora:sks_blob:1>",
                            "--lora-dir", str(work), "--size", "64", "--steps", "10", "-o", str(work / "sample.png")]),
        ("merge it into the base", ["merge", base, f"{lora}:0.8", "-o", str(work / "merged.safetensors")]),
        ("resize it to rank 2", ["resize", lora, "--rank", "2", "-o", str(work / "sks_blob_r2.safetensors")]),
        ("extract it back from the merge", ["extract", str(work / "merged.safetensors"), base, "--rank", "4",
                                            "-o", str(work / "extracted.safetensors"), "--device", "cpu"]),
        ("inspect the extracted LoRA", ["inspect", str(work / "extracted.safetensors")]),
    ]


@click.command("demo")
@click.option("--workdir", type=click.Path(path_type=Path, file_okay=False), help="Folder for the outputs. [default: a temp dir]")
@click.option("--keep", is_flag=True, help="Keep the outputs (always kept with --workdir).")
def command(workdir: Path | None, keep: bool) -> None:
    """Run the main jobs end to end on the bundled tiny SD1 base and dataset (about 9 s on a 2-core CPU)
    and show what each step printed."""
    from ..assets import tiny_base, tiny_dataset
    from ..cli import main
    from ..errors import LoratoolError
    from ..render.train import demo_result, demo_step, demo_summary

    base, data = tiny_base(), tiny_dataset()
    own = workdir is None
    work = Path(tempfile.mkdtemp(prefix="loratool-demo-")) if own else workdir
    work.mkdir(parents=True, exist_ok=True)
    steps = demo_steps(work, base, data)
    rows = []
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add waiting (measured 3× faster on a busy 2-core CPU)
    try:
        for i, (title, argv) in enumerate(steps, 1):
            demo_step(i, len(steps), title, argv)
            t0 = time.perf_counter()
            try:
                code = main([*argv, "--force"] if argv[0] not in ("inspect",) else argv)
            except Exception as exc:  # a step's bug must not hide the other steps' results
                click.echo(f"{type(exc).__name__}: {exc}", err=True)
                code = 1
            status = "ok" if code == 0 else "failed"
            rows.append((title, status, time.perf_counter() - t0))
            demo_result(i, title, status, rows[-1][2])
    finally:
        torch.set_num_threads(threads)
        demo_summary(rows, str(work), keep or not own)
        if own and not keep:
            shutil.rmtree(work, ignore_errors=True)
    failed = [t for t, s, _ in rows if s != "ok"]
    if failed:
        raise LoratoolError(f"demo: {len(failed)} step(s) failed: {', '.join(failed)}",
                            hint="the output above shows each step's error")
