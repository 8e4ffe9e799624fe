"""`loratool merge`: LoRAs into a checkpoint, or LoRAs into one LoRA."""

import click

from . import options as opt


@click.command("merge")
@click.argument("base")
@click.argument("loras", nargs=-1)
@opt.output("Output: .safetensors or .ckpt/.pt/.pth/.bin (a folder name for a diffusers base).", required=False)
@opt.force()
@opt.device()
@opt.dtype("Output dtype of float tensors (clamped to its range). [default: keep each tensor's]")
@click.option("--te-ratio", type=float, default=1.0, show_default=True, help="Multiplies every ratio for text-encoder modules.")
@click.option("--unet-ratio", type=float, default=1.0, show_default=True, help="Multiplies every ratio for UNet modules.")
@click.option("--lbw", help="LoRA Block Weight preset (OUTALL...) or comma list (17/26 numbers SD1/SD2, 12/20 SDXL).")
@click.option("--dry-run", is_flag=True, help="Show which module goes to which weight; write nothing.")
@click.option("--allow-unmapped", is_flag=True, help="Skip (and list) adapter keys that map to no weight.")
@click.option("--allow-nonfinite", is_flag=True, help="Merge adapters even if they hold NaN/Inf values.")
@opt.arch()
@click.option("--lora-dir", type=click.Path(file_okay=False), help="Folder for <lora:NAME:RATIO> arguments.")
@click.option("--into-lora", is_flag=True, help="BASE is a LoRA too: merge all adapters into one LoRA.")
@click.option("--mode", type=click.Choice(["concat", "svd"]), default="concat", show_default=True, help="LoRA+LoRA merge method.")
@click.option("--rank", type=int, help="Rank of the --mode svd result.")
@opt.json_output("loratool.merge/1")
def command(base, loras, out, force, device, dtype, te_ratio, unet_ratio, lbw, dry_run, allow_unmapped, allow_nonfinite, arch,
            lora_dir, into_lora, mode, rank, as_json) -> None:
    """Merge LORA[:RATIO]... (ratio default 1.0, negative allowed; or "<lora:NAME:0.8>") into BASE.

    If BASE is itself a LoRA (or --into-lora), every adapter is merged into one LoRA (--mode concat|svd).
    """
    from ..adapters import load_adapter
    from ..blockweights import parse_block_weights
    from ..detect import detect_checkpoint
    from ..errors import DetectionError, LoratoolError
    from ..io.source import open_file
    from ..ops import merge as ops
    from ..render import merge as render
    from ..render.common import progress_bar

    fallback_arch = None  # the base checkpoint's arch, for adapters whose own keys cannot decide

    def adapter(arg: str):
        path, ratio = ops.parse_adapter_arg(arg, lora_dir)
        try:
            return load_adapter(open_file(path), arch=arch, allow_unmapped=True), ratio
        except DetectionError:
            if arch or not fallback_arch:
                raise
            return load_adapter(open_file(path), arch=fallback_arch, allow_unmapped=True), ratio

    base_path, _ = ops.parse_adapter_arg(base, lora_dir)
    source = open_file(base_path)
    if into_lora or ops.looks_like_adapter(source.keys()):
        adapters = [adapter(base), *(adapter(a) for a in loras)]
        if not out or dry_run:
            raise LoratoolError("LoRA+LoRA merges need -o/--output and take no --dry-run", hint="e.g. -o merged.safetensors")
        block_weights = parse_block_weights(lbw, adapters[0][0].arch) if lbw else None
        with progress_bar("merging LoRAs", not as_json) as cb:
            report = ops.merge_adapters(
                adapters, out, mode=mode, rank=rank, dtype=dtype, device=device, te_ratio=te_ratio, unet_ratio=unet_ratio,
                block_weights=block_weights, allow_unmapped=allow_unmapped, allow_nonfinite=allow_nonfinite, force=force,
                on_progress=cb,
            )
        return render.adapter_report(report, as_json)
    if str(base_path) != base.strip():
        raise LoratoolError(
            f"{base!r}: the base checkpoint takes no ratio (only the LoRAs after it do)",
            hint=f"write loratool merge {base_path} LORA:RATIO ... -o OUT",
        )
    if not loras:
        raise LoratoolError("no LoRA to merge", hint="loratool merge BASE LORA[:RATIO]... -o OUT")
    if not out and not dry_run:
        raise LoratoolError("missing -o/--output", hint="name the output checkpoint, or use --dry-run")
    fallback_arch = detect_checkpoint(source.specs(), arch).arch
    adapters = [adapter(a) for a in loras]
    block_weights = parse_block_weights(lbw, adapters[0][0].arch) if lbw else None
    with progress_bar("merging", not (as_json or dry_run)) as cb:
        report = ops.merge_into_checkpoint(
            source, adapters, out, arch=arch, device=device, dtype=dtype, te_ratio=te_ratio, unet_ratio=unet_ratio,
            block_weights=block_weights, allow_unmapped=allow_unmapped, allow_nonfinite=allow_nonfinite, force=force,
            dry_run=dry_run, on_progress=cb,
        )
    render.checkpoint_report(report, as_json)
