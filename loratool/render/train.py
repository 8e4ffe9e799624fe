"""Terminal output of ``loratool train`` / ``sample`` / ``demo`` (rich lives here, not in the library)."""

from __future__ import annotations

from rich.table import Table

from .common import print_json, stdout


def train_report(result, as_json: bool = False) -> None:
    data = {
        "schema": "loratool.train/1",
        "output": str(result.output),
        "steps": result.steps,
        "epochs": result.epochs,
        "batches_per_epoch": result.batches_per_epoch,
        "images": result.num_images,
        "reg_images": result.num_reg_images,
        "buckets": result.buckets,
        "modules": result.modules,
        "first_loss": result.losses[0] if result.losses else None,
        "last_loss": result.losses[-1] if result.losses else None,
        "eval_loss_before": round(result.eval_loss_before, 6),
        "eval_loss_after": round(result.eval_loss_after, 6),
    }
    if as_json:
        print_json(data)
        return
    table = Table(show_header=False, box=None)
    table.add_row("output", str(result.output))
    table.add_row("steps", f"{result.steps} ({result.epochs:g} epochs of {result.batches_per_epoch} batches)")
    table.add_row("images", f"{result.num_images} (+{result.num_reg_images} regularisation)")
    table.add_row("buckets", ", ".join(f"{k}: {v}" for k, v in sorted(result.buckets.items())))
    if result.modules:
        table.add_row("LoRA modules", str(result.modules))
    table.add_row("eval loss", f"{result.eval_loss_before:.4f} → {result.eval_loss_after:.4f} (fixed noise, t = 200/500/800)")
    stdout.print(table)


def sample_report(path, prompt: str, loras: list[tuple[str, float, int]]) -> None:
    stdout.print(f"wrote [bold]{path}[/] for prompt [italic]{prompt!r}[/]")
    for name, weight, n in loras:
        stdout.print(f"  applied {name} at {weight:g} ({n} modules merged in memory)")


def demo_step(index: int, total: int, title: str, argv: list[str]) -> None:
    stdout.rule(f"[bold]step {index}/{total}: {title}")
    stdout.print("[dim]$ loratool " + " ".join(_quote(a) for a in argv))


def demo_result(index: int, title: str, status: str, seconds: float) -> None:
    colour = {"ok": "green", "failed": "red", "not built": "yellow"}.get(status, "white")
    stdout.print(f"[{colour}]step {index} {title}: {status}[/] ({seconds:.1f} s)")


def demo_summary(rows: list[tuple[str, str, float]], workdir: str, kept: bool) -> None:
    table = Table(title="loratool demo")
    table.add_column("step")
    table.add_column("status")
    table.add_column("seconds", justify="right")
    for title, status, seconds in rows:
        table.add_row(title, status, f"{seconds:.1f}")
    stdout.print(table)
    stdout.print(f"files: {workdir}" + ("" if kept else " (removed; pass --keep to keep them)"))


def _quote(a: str) -> str:
    return f'"{a}"' if (" " in a or "<" in a) else a
