"""`loratool sample`: one image from an SD1 checkpoint, with <lora:name:weight> from the prompt."""

from __future__ import annotations

from pathlib import Path

import click

from . import options as opt


@click.command("sample")
@click.option("--base", type=click.Path(path_type=Path), help="SD1 single-file checkpoint. [default: the bundled tiny base]")
@click.option("--prompt", required=True, help='Text; "<lora:NAME:0.8>" applies NAME.safetensors at 0.8.')
@click.option("--negative", default="", help="Negative prompt (the unconditional branch of guidance).")
@click.option("--lora-dir", type=click.Path(path_type=Path, file_okay=False), help="Folder searched for <lora:NAME>.")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Output .png file.")
@click.option("--steps", default=20, show_default=True, help="DDIM steps.")
@click.option("--guidance", default=7.5, show_default=True, help="Classifier-free guidance scale.")
@click.option("--seed", default=0, show_default=True)
@click.option("--size", help="WIDTHxHEIGHT or one side, multiples of 64. [default: 512; 128 for the tiny base]")
@click.option("--tokenizer", type=click.Path(path_type=Path, file_okay=False), help="Folder with CLIP vocab.json + merges.txt.")
@opt.device()
@opt.force()
def command(base, prompt, negative, lora_dir, output, steps, guidance, seed, size, tokenizer, device, force) -> None:
    """Generate an image with DDIM (seeded); LoRAs in the prompt are merged into the weights in memory."""
    from ..assets import tiny_base
    from ..io.writer import check_output
    from ..render.train import sample_report
    from ..runtime import resolve_device
    from ..train import cpu_threads, default_resolution
    from ..train.data import make_tokenizer
    from ..train.model import load_model
    from ..train.sample import apply_lora, find_lora, generate, parse_prompt, parse_size, save_png

    base = base or tiny_base()
    text, refs = parse_prompt(prompt)
    paths = [(r, find_lora(r.name, lora_dir)) for r in refs]
    check_output(output, [base, *(p for _, p in paths)], force)
    dev = resolve_device(device)
    model = load_model(base, dev)
    tok = make_tokenizer(model.text_encoder.cfg.vocab_size, tokenizer, model.text_encoder.cfg.max_positions)
    wh = parse_size(size, default_resolution(model))
    with cpu_threads(model, dev):
        applied = [(r.name, r.weight, apply_lora(model, p, r.weight)) for r, p in paths]
        image = generate(model, text, wh, steps, seed, guidance, negative, tok, dev)
    sample_report(save_png(image, output), text, applied)
