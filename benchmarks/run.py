"""Whole-process benchmarks: loratool's commands against ``cp``, naive baselines and sd-mecha, in one run.

    python benchmarks/run.py [--sdxl [--skip-sd1]] [--repeats N] [--keep DIR] [--mecha-python PY] [--no-lowrank]

Generates full-size synthetic files with the real SD1.5 (and with --sdxl, SDXL) layouts — seeded,
streamed to disk — then measures, each in its own process and each ``--repeats`` times (medians):

* ``loratool``: the command (``inspect --json``, ``convert --dtype bf16``, ``merge`` a rank-32 LoRA at 0.8);
* ``cp+sync``: ``cp`` of the same input file, then ``sync`` — the physical limit of a streamed job that
  reads the base once and writes the output once (loratool fsyncs its output too);
* ``naive``: ``safetensors.torch.load_file`` everything, work in memory, ``save_file``, ``fsync``;
* ``sd-mecha`` (merge only, where ``import sd_mecha`` works in ``--mecha-python``, default this python):
  its streamed ``add_difference(base, convert(lora, base), alpha=0.8)`` merge of the same files, then ``fsync``
  (for SD1.5, with a one-line mend of sd-mecha 1.1.8's SD1 kohya conversion: see :func:`_mend_mecha_sd1`).

Besides time and peak RSS, loratool's rows show what its streaming engine held at most (read-ahead plus
write-behind queues, from the ``stream`` object of its ``--json`` report) under the budget printed below the
table. The last warm run's merge outputs are kept and compared tensor by tensor: the naive and sd-mecha merges
against loratool's (elements that differ and by how many fp16 steps), so the rows are known to do the same job.

Every output is flushed to disk inside the timed step (loratool fsyncs before its rename), and every child
sets ``OMP_WAIT_POLICY=PASSIVE`` before importing torch, as the loratool CLI does.

Every case runs **cold** (the input dropped from the page cache with ``posix_fadvise(DONTNEED)``
first) and **warm** (the input read once first). Each repeat runs ``cp+sync`` and then every job once
(interleaved); a job's ratio is the median of its per-repeat ratios to that repeat's ``cp+sync``. resize and
extract have their own script with dense-SVD baselines (benchmarks/bench_resize_extract.py); run.py runs
it too unless --no-lowrank. Generated files go to a temp folder, deleted at the end unless --keep.
Not part of the test suite: on this 2-core machine SD1.5 takes a few minutes, SDXL ~15 more.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # support.synth: the file generator

from harness import child_main, cold, compare_checkpoints, loratool, run_child, warm  # noqa: E402

HERE = Path(__file__).resolve()


# ----------------------------------------------------------------------------- steps (run in children)


def _fsync(path: str) -> None:
    """Flush an output to disk inside the timed step, as loratool and cp+sync do (same durability for every row)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def inspect_loratool(ckpt: str, lora: str, out: str) -> None:
    loratool("inspect", ckpt, "--json", quiet=True)


def inspect_naive(ckpt: str, lora: str, out: str) -> None:
    from safetensors.torch import load_file

    sd = load_file(ckpt)
    _ = {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}


def _held(report: str) -> dict:
    """From a ``--json`` report: the bytes the streaming engine held at most (read-ahead + write-behind queues),
    its budget, and the largest item (the one allowed past a budget), in MiB."""
    s = json.loads(report)["stream"]
    return {"stream_mib": (s["peak_read_ahead_bytes"] + s["peak_write_behind_bytes"]) / 2**20,
            "budget_mib": s["budget_bytes"] / 2**20, "largest_item_mib": s["largest_item_bytes"] / 2**20}


def convert_loratool(ckpt: str, lora: str, out: str) -> dict:
    return _held(loratool("convert", ckpt, out, "--dtype", "bf16", "--force", "--json", quiet=True))


def convert_naive(ckpt: str, lora: str, out: str) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    sd = load_file(ckpt)
    save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd.items()}, out)
    _fsync(out)


def merge_loratool(ckpt: str, lora: str, out: str) -> dict:
    return _held(loratool("merge", ckpt, f"{lora}:0.8", "-o", out, "--force", "--json", quiet=True))


def merge_naive(ckpt: str, lora: str, out: str) -> None:
    from safetensors.torch import load_file, save_file

    from loratool.adapters import apply_to_weight, load_adapter
    from loratool.io.source import open_file

    sd = load_file(ckpt)
    for m in load_adapter(open_file(lora)).modules.values():
        t = m.target
        w = sd[t.address]
        if t.rows is None:
            sd[t.address] = apply_to_weight(w, m, 0.8).to(w.dtype)
        else:
            a, b = t.rows
            w[a:b] = apply_to_weight(w[a:b], m, 0.8).to(w.dtype)
    save_file(sd, out)
    _fsync(out)


def cp_sync(ckpt: str, lora: str, out: str) -> None:
    subprocess.run(["cp", ckpt, out], check=True)
    subprocess.run(["sync"], check=True)


def merge_mecha(ckpt: str, lora: str, out: str) -> None:
    """sd-mecha's streamed LoRA merge (1.x API). ``add_difference`` itself fails on an unsolved merge space
    in 1.1.8, so the linear method is called directly, with the base as fallback for untouched keys."""
    import sd_mecha
    from sd_mecha.extensions.builtin.merge_methods import linear

    arch = "sdxl" if "sdxl" in Path(ckpt).name else "sd1"
    if arch == "sd1":
        _mend_mecha_sd1()
    base = sd_mecha.model(ckpt, "sdxl-sgm" if arch == "sdxl" else "sd1-ldm")
    delta = sd_mecha.convert(sd_mecha.model(lora, f"{arch}-kohya_kohya_lora"), base)
    sd_mecha.merge(linear.add_difference(base, delta, alpha=0.8) | base, output=out)
    _fsync(out)


def _mend_mecha_sd1() -> None:
    """sd-mecha 1.1.8's SD1 kohya → ldm conversion indexes its key relation itself
    (``relation["kohya_sd"][0]``, a ``TypeError``) where its SDXL one reads ``relation.inputs["kohya_sd"]``.
    For this benchmark's process only, the relation class answers ``[param]`` with ``.inputs[param]``: the
    conversion then reads the key it names, and nothing else of sd-mecha changes."""
    from sd_mecha.keys_map import RealizedKeyRelation

    if not hasattr(RealizedKeyRelation, "__getitem__"):
        RealizedKeyRelation.__getitem__ = lambda self, param: self.inputs[param]


STEPS = {f"{job}_{kind}": globals()[f"{job}_{kind}"] for job in ("inspect", "convert", "merge") for kind in ("loratool", "naive")}
STEPS["cp_sync"] = cp_sync
STEPS["merge_mecha"] = merge_mecha


# ----------------------------------------------------------------------------- driver


def _files(folder: Path, arch: str) -> tuple[Path, Path]:
    from support.synth import iter_lora, write_checkpoint

    from loratool.io.output import save_tensors

    ckpt, lora = folder / f"{arch}-full.safetensors", folder / f"{arch}-lora-r32.safetensors"
    if not ckpt.exists():
        write_checkpoint(ckpt, arch, factor=1, seed=0, force=True)
    if not lora.exists():
        save_tensors(lora, dict(iter_lora(arch, rank=32, alpha=16.0, factor=1, seed=1)), force=True)
    return ckpt, lora


def _measure_once(folder: Path, step: str, ckpt: Path, lora: Path, mode: str, python: str | None = None,
                  keep: bool = False) -> dict:
    """One measured run of ``step``; its output is deleted, or with ``keep`` renamed ``kept-<step>.safetensors``."""
    out = folder / f"out-{step}.safetensors"
    (warm if mode == "warm" else cold)(str(ckpt))
    (warm if mode == "warm" else cold)(str(lora))
    try:
        return run_child(str(HERE), step, str(ckpt), str(lora), str(out), python=python)
    finally:
        if out.exists():
            if keep:
                out.replace(folder / f"kept-{step}.safetensors")
            else:
                out.unlink()
        subprocess.run(["sync"], check=True)  # the next run starts without someone else's dirty pages


def _mecha_python(arg: str | None) -> str | None:
    py = arg or sys.executable
    ok = subprocess.run([py, "-c", "import sd_mecha"], capture_output=True).returncode == 0
    return py if ok else None


def _bench_arch(folder: Path, arch: str, repeats: int, mecha: str | None) -> tuple[list, list[str]]:
    """Each repeat runs ``cp+sync`` and then every job once (interleaved, so a slow spell of the shared disk
    falls on every row alike); a job's ratio is the median of its per-repeat ratios to that repeat's cp+sync.

    Returns the table rows and one line per baseline merge saying how its output (the last warm run's)
    compares with loratool's, tensor by tensor: the rows compare the same job only if the outputs agree."""
    ckpt, lora = _files(folder, arch)
    jobs = [(f"{job} {kind}", f"{job}_{kind}", mecha if kind == "mecha" else None)
            for job in ("inspect", "convert", "merge") for kind in ("loratool", "naive", "mecha")
            if kind != "mecha" or (job == "merge" and mecha is not None)]
    rows = []
    for mode in ("cold", "warm"):
        runs: dict[str, list[dict]] = {"cp+sync": []}
        failed: set[str] = set()
        for r in range(repeats):
            cp = _measure_once(folder, "cp_sync", ckpt, lora, mode)
            runs["cp+sync"].append(cp)
            for name, step, python in jobs:
                if name in failed:
                    continue
                keep = step.startswith("merge") and mode == "warm" and r == repeats - 1
                try:
                    result = _measure_once(folder, step, ckpt, lora, mode, python, keep)
                except RuntimeError as exc:  # a peer tool that fails on this input is reported, not fatal
                    last = [line for line in str(exc).splitlines() if line.strip()][-1]
                    print(f"  {arch} {mode} {name} failed: {last}", file=sys.stderr)
                    failed.add(name)
                    for stale in folder.glob("out-*"):
                        stale.unlink()
                    continue
                result["vs_cp"] = result["seconds"] / cp["seconds"]
                runs.setdefault(name, []).append(result)
            print(f"  {arch} {mode} run {r + 1}/{repeats}: done", file=sys.stderr)
        for name, rs in runs.items():
            rows.append((arch, mode, name, {k: statistics.median(x[k] for x in rs) for k in rs[0]
                                            if isinstance(rs[0][k], (int, float))}))
    return rows, _agreement(folder, arch)


def _agreement(folder: Path, arch: str) -> list[str]:
    """Compare the kept baseline merge outputs with loratool's (then delete them all)."""
    ours = folder / "kept-merge_loratool.safetensors"
    lines = []
    for kind in ("naive", "mecha"):
        theirs = folder / f"kept-merge_{kind}.safetensors"
        if ours.exists() and theirs.exists():
            c = compare_checkpoints(theirs, ours, same_keys=False)
            if "error" in c:
                lines.append(f"{arch} merge {kind} vs loratool: {c['error']}")
            else:
                lines.append(f"{arch} merge {kind} vs loratool: {c['keys']} keys compared ({c['only_a']} only in {kind}'s,"
                             f" {c['only_b']} only in ours, {c['other_dtype']} in another dtype), {c['differing']} of"
                             f" {c['elements']} elements differ, at most {c['max_ulp']} fp16 steps (max relative Frobenius"
                             f" error {c['max_rel_fro']:.1e})")
    for kept in folder.glob("kept-*"):
        kept.unlink()
    return lines


def _table(rows: list[tuple[str, str, str, dict]]) -> str:
    """One line per job; 'stream held' is the most the streaming engine's two queues held (loratool's rows)."""
    lines = [f"{'arch':5} {'cache':5} {'job':18} {'seconds':>8} {'× cp+sync':>10} {'peak RSS MiB':>13} {'own (anon) MiB':>15}"
             f" {'stream held MiB':>16}"]
    for arch, mode, name, r in rows:
        ratio = f"{r['vs_cp']:10.2f}" if "vs_cp" in r else f"{'1.00':>10}"
        held = f"{r['stream_mib']:16.0f}" if "stream_mib" in r else f"{'-':>16}"
        lines.append(f"{arch:5} {mode:5} {name:18} {r['seconds']:8.2f} {ratio} {r['maxrss_mib']:13.0f} {r['anon_mib']:15.0f}"
                     f" {held}")
    streamed = [r for *_, r in rows if "budget_mib" in r]
    if streamed:
        lines.append(f"stream budget: {streamed[0]['budget_mib']:.0f} MiB read ahead + {streamed[0]['budget_mib']:.0f} MiB"
                     f" written behind; a queue holds one larger item when empty (largest item here"
                     f" {max(r['largest_item_mib'] for r in streamed):.0f} MiB)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", nargs="+")
    ap.add_argument("--sdxl", action="store_true", help="also benchmark the SDXL layout (~7 GB file)")
    ap.add_argument("--skip-sd1", action="store_true", help="with --sdxl: the SDXL layout only")
    ap.add_argument("--keep", help="work in this folder and keep the generated files")
    ap.add_argument("--no-lowrank", action="store_true", help="skip benchmarks/bench_resize_extract.py")
    ap.add_argument("--repeats", type=int, default=3, help="runs per case (medians are printed)")
    ap.add_argument("--mecha-python", help="a python that can import sd_mecha (default: this one, if it can)")
    args = ap.parse_args()
    if args.child:
        child_main(STEPS, args.child)
        return
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="loratool-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        mecha = _mecha_python(args.mecha_python)
        rows, agreement = [], []
        for arch in ([] if args.skip_sd1 and args.sdxl else ["sd1"]) + (["sdxl"] if args.sdxl else []):
            arch_rows, arch_agreement = _bench_arch(folder, arch, args.repeats, mecha)
            rows += arch_rows
            agreement += arch_agreement
        print(f"{os.cpu_count()} CPUs; medians of {args.repeats}; '× cp+sync' is the ratio to cp + sync of the same input in the"
              f" same cache mode{'' if mecha else '; sd-mecha not importable, skipped'}")
        print(_table(rows))
        print("\n".join(agreement))
        if not args.no_lowrank:
            sys.stdout.flush()
            subprocess.run([sys.executable, str(HERE.parent / "bench_resize_extract.py"), "--threads", "1"], check=True)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
