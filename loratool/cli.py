"""The ``loratool`` command group. Each command lives in ``loratool/commands/<name>.py``
and is imported only when it runs, so ``loratool inspect`` never imports the trainer."""

from __future__ import annotations

import importlib
import os
import signal
import sys

import click

from .errors import LoratoolError
from .runtime import reuse_freed_memory

# command name → (module under loratool.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "inspect": ("inspect", "Show what a checkpoint or adapter file is."),
    "convert": ("convert", "Convert containers, dtypes, LoRA naming and checkpoint layouts."),
    "merge": ("merge", "Merge LoRAs into a checkpoint, or LoRAs into one LoRA."),
    "resize": ("resize", "Reduce a LoRA's rank by exact SVD of its factors."),
    "extract": ("extract", "Extract a LoRA from a fine-tune's difference to its base."),
    "train": ("train", "Train a LoRA (or fine-tune) on a folder of images."),
    "sample": ("sample", "Generate an image with the built-in SD1 model (shows a LoRA's effect)."),
    "demo": ("demo", "Run train → inspect → merge → resize → extract on bundled fixtures."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module = importlib.import_module(f"loratool.commands.{COMMANDS[name][0]}")
        return module.command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="loratool")
@click.option("--debug", is_flag=True, help="Print the traceback of internal errors (bugs).")
def cli(debug: bool) -> None:
    """One tool for Stable Diffusion checkpoints and LoRAs (SD1.x, SD2.x, SDXL).

    Inputs are never modified; outputs are written to a temporary file and renamed.
    """


def _raise_terminated(signum: int, frame) -> None:
    raise Terminated(signum)


class Terminated(BaseException):
    """SIGTERM / SIGHUP, raised where Python next runs so every temporary output is removed on the way out."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _install_signal_handlers() -> dict:
    """TERM and HUP unwind like Ctrl-C (writers and folder outputs delete their temporary files)."""
    previous = {}
    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is not None:
            try:
                previous[sig] = signal.signal(sig, _raise_terminated)
            except ValueError:  # not the main thread (embedded use): leave the handlers alone
                pass
    return previous


class _FreezeAfterTorch:
    """A one-shot import hook: once ``import torch`` has finished, :func:`gc.freeze` its objects.

    torch leaves ~10^6 long-lived objects; every later full garbage collection walks all of them
    (0.1-0.25 s each on a 2-core machine; one or two happen while a merge builds its tables).
    Frozen, they are never walked again; objects created afterwards are collected as usual.
    """

    def find_spec(self, name, path=None, target=None):
        if name != "torch":
            return None
        sys.meta_path.remove(self)
        import importlib.util

        spec = importlib.util.find_spec("torch")
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            import gc

            gc.freeze()

        spec.loader.exec_module = exec_module  # this loader instance serves torch/__init__.py only
        return spec


def _freeze_torch_when_imported() -> None:
    if "torch" not in sys.modules and not any(isinstance(f, _FreezeAfterTorch) for f in sys.meta_path):
        sys.meta_path.insert(0, _FreezeAfterTorch())


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI; bad input → one line + hint, exit 2; a bug → exit 1 ("please report").

    ``--debug`` (before the command) prints the traceback of internal errors.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    # Idle OpenMP threads sleep instead of spinning (read when torch loads, which the commands do lazily):
    # next to another CPU job, spinning threads made 2-thread work up to 30x slower on a 2-core machine.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _freeze_torch_when_imported()
    reuse_freed_memory()
    debug = "--debug" in args[: next((i for i, a in enumerate(args) if a in COMMANDS), len(args))]
    previous = _install_signal_handlers()
    try:
        cli.main(args=args, prog_name="loratool", standalone_mode=False)
    except LoratoolError as exc:
        from .render.common import print_error

        print_error(exc)
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        return 130
    except Terminated as exc:
        click.echo(f"Terminated by signal {exc.signum}; no output was written.", err=True)
        return 128 + exc.signum
    except KeyboardInterrupt:
        click.echo("Interrupted; no output was written.", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 - anything else is a bug in loratool, never the user's fault
        from .render.common import print_internal_error

        print_internal_error(exc, debug)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def run() -> None:
    """The console entry point (``loratool``, ``python -m loratool``): :func:`main`, then exit.

    Once torch is loaded, Python's own shutdown (tearing down torch's thousands of modules and
    objects) takes ~0.8 s on a 2-core machine, after the work is done and every output is renamed
    into place. So the process flushes stdout and stderr and leaves with ``os._exit``: every file
    loratool writes is closed, fsynced and renamed before :func:`main` returns, and no thread of
    ours is still running. Without torch (``inspect`` of a checkpoint, ``--help``) it exits normally.
    """
    code = main()
    if "torch" not in sys.modules:
        sys.exit(code)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`loratool inspect … | head`): nothing more to say
            code = code or 1
    os._exit(code)


if __name__ == "__main__":
    run()
