"""`loratool convert IN OUT`: containers, dtypes, pruning, LoRA naming, LyCORIS → LoRA, checkpoint layouts."""

from __future__ import annotations

from pathlib import Path

import click

from . import options as opt


@click.command("convert")
@click.argument("src", metavar="IN", type=click.Path(exists=True, path_type=Path))
@click.argument("out", metavar="OUT", type=click.Path(path_type=Path))
@click.option(
    "--to",
    "to",
    type=click.Choice(["kohya", "peft", "diffusers", "ldm", "lora", "components", "comfyui"]),
    help="LoRA naming (kohya, peft, diffusers; comfyui: FLUX diffusion_model.<BFL path>.lora_A/B), plain LoRA from "
         "LyCORIS (lora), checkpoint layout (ldm, diffusers), or a FLUX.1 ComfyUI all-in-one file → a folder of "
         "component files (components) and back (comfyui, with --clip-l/--t5/--vae).",
)
@click.option("--clip-l", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="--to comfyui: the CLIP-L file (ComfyUI models/text_encoders) to put beside the transformer IN.")
@click.option("--t5", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="--to comfyui: the T5-XXL file.")
@click.option("--vae", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="--to comfyui: the autoencoder file (ae.safetensors).")
@opt.dtype("Cast float tensors (clamped to the format's range); integer tensors are never touched.")
@click.option("--prune", is_flag=True, help="Drop EMA weights and training-only state from a full checkpoint.")
@click.option("--scaled", is_flag=True,
              help="With --dtype fp8_e4m3fn/fp8_e5m2 on a FLUX.1 checkpoint: ComfyUI scaled fp8 (a scale_weight per "
                   "weight). A scaled fp8 input converted to any other dtype is dequantized.")
@opt.arch()
@click.option("--max-rank", type=click.IntRange(min=1), help="LyCORIS → LoRA: cap the output rank (default: exact rank).")
@click.option(
    "--max-error",
    type=click.FloatRange(min=0),
    default=0.01,
    show_default=True,
    help="LyCORIS → LoRA: refuse when a module's relative ΔW error exceeds this.",
)
@click.option("--prediction-type", type=click.Choice(["epsilon", "v_prediction"]),
              help="--to diffusers: the scheduler's prediction type. [default: v_prediction for SD2 (768-v) and "
                   "SDXL files with a v_pred key, else epsilon]")
@opt.force()
@opt.json_output("loratool.convert/1")
def command(
    src: Path,
    out: Path,
    to: str | None,
    dtype: str | None,
    prune: bool,
    arch: str | None,
    max_rank: int | None,
    max_error: float,
    prediction_type: str | None,
    force: bool,
    as_json: bool,
    scaled: bool = False,
    clip_l: Path | None = None,
    t5: Path | None = None,
    vae: Path | None = None,
) -> None:
    """Convert IN to OUT. OUT's extension picks the container (.safetensors, or .ckpt/.pt/.pth/.bin).

    \b
    loratool convert model.ckpt model.safetensors --dtype fp16 --prune
    loratool convert lora.safetensors lora-peft.safetensors --to peft
    loratool convert loha.safetensors lora.safetensors --to lora
    loratool convert model.safetensors model-folder --to diffusers
    loratool convert flux-aio.safetensors parts --to components
    loratool convert parts/transformer.safetensors aio.safetensors --to comfyui --clip-l parts/clip_l.safetensors \\
        --t5 parts/t5xxl.safetensors --vae parts/ae.safetensors
    """
    from contextlib import ExitStack

    from ..errors import LoratoolError
    from ..io.source import open_file
    from ..ops.components import join_components, split_components
    from ..ops.convert import convert
    from ..render import convert as render
    from ..render.common import progress_bar

    extra = {"text_encoder": clip_l, "text_encoder_2": t5, "vae": vae}

    def _is_adapter(path: Path) -> bool:
        from ..ops.convert import classify

        with open_file(path) as s:
            return classify(s) == "adapter"

    if to != "comfyui" and any(extra.values()):
        raise LoratoolError("--clip-l, --t5 and --vae go with --to comfyui", hint="leave them out, or add --to comfyui")
    joins = to == "comfyui" and (any(extra.values()) or not _is_adapter(src))
    if to == "components" or joins:
        with ExitStack() as stack:
            source = stack.enter_context(open_file(src))
            bar = stack.enter_context(progress_bar(f"converting {src.name}", not as_json,
                                                   lambda key: key.rsplit(".", 2)[0][-48:]))
            if to == "components":
                report = split_components(source, out, dtype=dtype, force=force, on_progress=bar)
            else:
                parts = {"transformer": source}
                parts.update({c: stack.enter_context(open_file(p)) for c, p in extra.items() if p is not None})
                report = join_components(parts, out, dtype=dtype, force=force, on_progress=bar)
        render.render_json(report) if as_json else render.render(report)
        return
    source = open_file(src)
    try:
        with progress_bar(f"converting {src.name}", not as_json, lambda key: key.rsplit(".", 2)[0][-48:]) as on_progress:
            report = convert(
                source,
                out,
                to=to,
                dtype=dtype,
                prune=prune,
                arch=arch,
                force=force,
                max_rank=max_rank,
                max_error=max_error,
                on_progress=on_progress,
                prediction_type=prediction_type,
                scaled=scaled,
            )
    finally:
        source.close()
    if as_json:
        render.render_json(report)
    else:
        render.render(report)
