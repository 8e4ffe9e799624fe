"""`loratool inspect FILE...`: what a checkpoint or adapter file is, with the evidence."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("inspect")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Stable JSON on stdout (schema loratool.inspect/2), one object per file.")
@click.option("--keys", is_flag=True, help="List every key with shape, dtype and the checkpoint weight it maps to.")
@click.option("--stats", is_flag=True, help="Read every tensor: NaN/Inf check, per-block effective ΔW norm of adapters.")
@click.option("--arch", type=click.Choice(["sd1", "sd2", "sdxl"]), help="Force the architecture instead of detecting it.")
@click.option(
    "--hash/--no-hash",
    "hashes",
    default=None,
    help="Compute file hashes (sha256, AutoV2, addnet, legacy). Default: adapters yes, checkpoints no.",
)
def command(files: tuple[Path, ...], as_json: bool, keys: bool, stats: bool, arch: str | None, hashes: bool | None) -> None:
    """Show what FILE is: kind, architecture (with score and runner-up), adapter family,
    ranks/alphas, training parameters, trigger words and hashes.

    Reads only the header unless --stats, --keys or hashes ask for more.
    """
    from ..errors import LoratoolError
    from ..inspection import inspect_source
    from ..io.source import open_file
    from ..render import inspect as render
    from ..render.common import print_error, progress_bar

    reports, failed = [], []
    for f in files:
        try:
            with open_file(f) as source:
                with progress_bar(f"checking {f.name}", stats and not as_json) as on_progress:
                    reports.append(
                        inspect_source(source, arch=arch, hashes=hashes, keys=keys, stats=stats, on_progress=on_progress)
                    )
        except LoratoolError as exc:  # report the other files, then fail
            failed.append(exc)
    if as_json:
        render.render_json(reports)
    else:
        render.render(reports)
    for exc in failed[:-1]:
        print_error(exc)
    if failed:
        last = failed[-1]
        if len(failed) > 1 or reports:
            last.hint = (last.hint + "; " if last.hint else "") + f"{len(reports)} of {len(files)} files inspected"
        raise last
