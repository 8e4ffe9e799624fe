"""`loratool train`: a kohya-format LoRA (or a full UNet fine-tune) from a DreamBooth-style folder."""

from __future__ import annotations

from pathlib import Path

import click

from . import options as opt

_PATH = click.Path(path_type=Path)


@click.command("train")
@click.option("--base", type=_PATH, default=None, help="SD1 single-file checkpoint. [default: the bundled tiny base]")
@click.option("--data", type=_PATH, required=True, help="Folder of N_identifier class/ subfolders (N repeats).")
@click.option("--reg-data", type=_PATH, help="Regularisation images, same folder layout (prior preservation).")
@opt.output("Output: .safetensors, or .ckpt/.pt/.pth/.bin for a torch pickle.")
@click.option("--rank", default=4, show_default=True, help="LoRA rank (kohya network_dim).")
@click.option("--alpha", default=1.0, show_default=True, help="LoRA alpha; ΔW is scaled by alpha/rank.")
@click.option("--conv-rank", default=0, show_default=True, help="Rank of 3x3 convs (LoCon); 0 leaves them out.")
@click.option("--conv-alpha", type=float, help="Alpha of 3x3 convs. [default: --conv-rank]")
@click.option("--lr", "learning_rate", default=1e-4, show_default=True, help="AdamW learning rate.")
@click.option("--steps", type=int, help="Optimiser steps (overrides --epochs).")
@click.option("--epochs", default=1, show_default=True, help="Passes over the data (each image × its repeats).")
@click.option("--batch-size", default=1, show_default=True)
@click.option("--resolution", type=int, help="Bucket area side in pixels. [default: 512; 128 for the tiny base]")
@click.option("--bucket-step", default=64, show_default=True, help="Bucket sides are multiples of this (≥ 64).")
@click.option("--prior-loss-weight", default=1.0, show_default=True, help="Loss weight of regularisation images.")
@click.option("--tokenizer", type=click.Path(path_type=Path, file_okay=False), help="Folder with CLIP vocab.json + merges.txt.")
@click.option("--unet-only", is_flag=True, help="Train no text-encoder modules.")
@click.option("--full", is_flag=True, help="Fine-tune every UNet weight and write a full checkpoint (input for extract).")
@opt.dtype("Output dtype. [default: LoRA fp16; --full: the base's]", "--save-dtype")
@click.option("--output-name", help="ss_output_name. [default: output file stem]")
@click.option("--seed", default=0, show_default=True)
@opt.device()
@opt.force()
@opt.json_output("loratool.train/1")
def command(base, data, reg_data, out, rank, alpha, conv_rank, conv_alpha, learning_rate, steps, epochs, batch_size,
            resolution, bucket_step, prior_loss_weight, tokenizer, unet_only, full, dtype, output_name, seed, device,
            force, as_json) -> None:
    """Train a LoRA on SD1 with the ε-prediction DDPM loss (kohya's DreamBooth folder method).

    Images in DATA/10_sks dog/ repeat 10 times per epoch; a caption is image.txt or image.caption
    beside the image, else the folder's "sks dog". The LoRA is written in kohya format with ss_*
    metadata (trigger words in ss_tag_frequency) and sshs hashes.
    """
    from ..assets import tiny_base
    from ..render.common import progress_bar
    from ..render.train import train_report
    from ..train import TrainOptions, train

    if bucket_step < 64 or bucket_step % 64:
        raise click.BadParameter("must be a multiple of 64 (latents are 1/8 size and the UNet halves them 3 times)",
                                 param_hint="--bucket-step")
    opts = TrainOptions(
        base=base or tiny_base(), data=data, output=out, reg_data=reg_data, rank=rank, alpha=alpha,
        conv_rank=conv_rank, conv_alpha=conv_alpha, learning_rate=learning_rate, steps=steps, epochs=epochs,
        batch_size=batch_size, resolution=resolution, bucket_step=bucket_step, seed=seed, device=device, full=full,
        train_text_encoder=not unet_only, prior_loss_weight=prior_loss_weight, tokenizer=tokenizer,
        save_dtype=dtype, output_name=output_name, force=force,
    )
    with progress_bar("training", not as_json) as on_progress:
        result = train(opts, on_progress=on_progress)
    train_report(result, as_json)
