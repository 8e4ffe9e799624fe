"""Shared console, progress bar and error rendering (stderr for progress and errors, stdout for results)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from .. import progress as protocol
from ..errors import LoratoolError

stdout = Console(highlight=False, soft_wrap=True, emoji=False)
stderr = Console(stderr=True, highlight=False, emoji=False)


def print_error(exc: LoratoolError) -> None:
    """One line ``error: message``; the hint on the next line. No traceback."""
    line = " ".join(str(exc.message).split())
    stderr.print(f"[bold red]error:[/] {escape(line)}", soft_wrap=True)
    if exc.hint:
        stderr.print(f"[dim]hint:[/] {escape(exc.hint)}", soft_wrap=True)


def print_internal_error(exc: BaseException, debug: bool = False) -> None:
    """A bug in loratool (not the user's input): say so, and show the traceback with ``--debug``."""
    import traceback

    line = " ".join(f"{type(exc).__name__}: {exc}".split())
    stderr.print(f"[bold red]internal error, please report:[/] {escape(line)}", soft_wrap=True)
    if debug:
        sys.stderr.write("".join(traceback.format_exception(exc)))
    else:
        stderr.print("[dim]hint:[/] rerun with loratool --debug ... for the traceback, and report it", soft_wrap=True)


def print_json(data: object) -> None:
    """Stable JSON on stdout: sorted keys, two-space indent."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


@contextmanager
def progress_bar(
    description: str, enabled: bool = True, label: Callable[[str], str] | None = None
) -> Iterator[protocol.Progress]:
    """Yield a :data:`~loratool.progress.Progress` callback drawing a bar on stderr. The bar opens on the
    first call, when the total is known, so an error while loading is not preceded by an empty bar.

    ``label`` shortens the unit's label for the note column (default: its last 48 characters).
    """
    shorten = label or (lambda text: text[-48:])
    with ExitStack() as stack:
        state: dict = {}

        def on_progress(done: int, total: int, name: str) -> None:
            if not enabled:
                return
            if "advance" not in state:
                state["advance"] = stack.enter_context(progress(description, total))
                state["done"] = 0
            state["advance"](done - state["done"], shorten(name))
            state["done"] = done

        yield on_progress


@contextmanager
def progress(description: str, total: int | None, enabled: bool = True) -> Iterator[callable]:
    """A rich progress bar on stderr; yields ``advance(n=1, note=None)``."""
    if not enabled:
        yield lambda n=1, note=None: None
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("[dim]{task.fields[note]}"),
    )
    with Progress(*columns, console=stderr, transient=False) as bar:
        task = bar.add_task(description, total=total, note="")

        def advance(n: int = 1, note: str | None = None) -> None:
            if note is not None:
                bar.update(task, advance=n, note=note)
            else:
                bar.advance(task, n)

        yield advance
