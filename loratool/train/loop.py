"""LoRA / LoCon / full fine-tuning of SD1 with the ε-prediction DDPM objective.

Objective: for a latent ``x₀`` (VAE mean × 0.18215), noise ``ε ~ N(0, I)`` and ``t ~ U{0..999}``,
``x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε`` and the loss is ``w·‖ε̂(x_t, t, c) − ε‖²`` (mean over elements), with
``w = prior_loss_weight`` for regularisation images and 1 otherwise; AdamW on the trainable tensors.

LoRA modules sit on kohya's target modules (:func:`loratool.arch.kohya_modules`) and compute
``W' = W + (alpha/rank)·up·down`` with :func:`loratool.adapters.lora_delta`, so the saved file
means exactly what the training forward pass computed. Every random draw comes from one seeded
generator: the same seed, data and options give byte-identical output on the same device.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import dtypes
from ..adapters import lora_delta
from ..adapters.io import module_tensors, save_adapter
from ..arch import kohya_modules
from ..errors import LoratoolError
from ..io.output import open_writer
from ..io.source import open_file
from ..io.writer import SafetensorsWriter, check_output, container_for
from ..metadata import now
from ..metadata.kohya import base_model_fields, conv_network_args, network_fields
from ..progress import Progress
from ..runtime import resolve_device, threads
from .data import (
    Item,
    Subset,
    choose_bucket,
    dataset_dirs,
    expand,
    image_size,
    load_image,
    make_buckets,
    make_tokenizer,
    read_subsets,
    tag_frequency,
)
from .model import StableDiffusion, alphas_cumprod, load_model


class LoRAModule(nn.Module):
    """A frozen ``nn.Linear`` / ``nn.Conv2d`` plus a trainable low-rank ΔW.

    ``forward`` runs the base op with ``W + multiplier·(alpha/rank)·lora_delta(down, up)``.
    ``down`` is (rank, in[, kh, kw]) with Kaiming-uniform init, ``up`` (out, rank[, 1, 1]) starts at zero,
    so training starts from the base model's output.
    """

    def __init__(self, name: str, base: nn.Module, rank: int, alpha: float):
        super().__init__()
        self.name = name
        self.base = base
        self.rank = rank
        self.alpha = float(alpha)
        w = base.weight
        if isinstance(base, nn.Conv2d):
            down_shape, up_shape = (rank, w.shape[1], *w.shape[2:]), (w.shape[0], rank, 1, 1)
        else:
            down_shape, up_shape = (rank, w.shape[1]), (w.shape[0], rank)
        self.lora_down = nn.Parameter(torch.empty(down_shape, device=w.device, dtype=torch.float32))
        self.lora_up = nn.Parameter(torch.zeros(up_shape, device=w.device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_down, a=math.sqrt(5))
        self.multiplier = 1.0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """``(alpha/rank)·up·down`` in the base weight's shape."""
        return self.scale * lora_delta(self.lora_down, self.lora_up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.base
        w = b.weight + self.multiplier * self.delta().to(b.weight.dtype)
        if isinstance(b, nn.Conv2d):
            return F.conv2d(x, w, b.bias, b.stride, b.padding, b.dilation, b.groups)
        return F.linear(x, w, b.bias)


def _module_path(address: str) -> str:
    return address.removesuffix(".weight")


def inject_lora(
    model: StableDiffusion, rank: int, alpha: float, conv_rank: int = 0, conv_alpha: float | None = None,
    text_encoder: bool = True,
) -> dict[str, LoRAModule]:
    """Wrap kohya's SD1 target modules of ``model`` in :class:`LoRAModule` (in place); returns them by kohya name.

    Linear and 1×1-conv targets get ``rank``/``alpha``; 3×3 convs get ``conv_rank``/``conv_alpha``
    (LoCon) when ``conv_rank`` > 0; text-encoder targets only when ``text_encoder``.
    """
    out: dict[str, LoRAModule] = {}
    for name, target in kohya_modules("sd1").items():
        if target.rows is not None:
            continue
        if target.component != "unet" and not text_encoder:
            continue
        if target.kind == "conv3x3":
            if conv_rank <= 0:
                continue
            r, a = conv_rank, conv_alpha if conv_alpha is not None else conv_rank
        else:
            r, a = rank, alpha
        path = _module_path(target.address)
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        base = getattr(parent, child)
        if isinstance(base, LoRAModule):
            base = base.base
        mod = LoRAModule(name, base, r, a)
        setattr(parent, child, mod)
        out[name] = mod
    return out


def lora_tensors(modules: dict[str, LoRAModule], dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The trained network in kohya naming (:func:`loratool.adapters.io.module_tensors`), sorted by key."""
    out: dict[str, torch.Tensor] = {}
    targets = kohya_modules("sd1")
    for name, m in modules.items():
        out.update(module_tensors(
            targets[name], "kohya", m.lora_down.detach().to("cpu", dtype).contiguous(),
            m.lora_up.detach().to("cpu", dtype).contiguous(), dtypes.exact_scalar(float(m.alpha), dtypes.name_of(dtype)),
        ))
    return dict(sorted(out.items()))


@dataclass(frozen=True)
class TrainOptions:
    """What ``loratool train`` takes; see ``loratool train --help`` for each field."""

    base: Path
    data: Path
    output: Path
    reg_data: Path | None = None
    rank: int = 4
    alpha: float = 1.0
    conv_rank: int = 0
    conv_alpha: float | None = None
    learning_rate: float = 1e-4
    steps: int | None = None
    epochs: int = 1
    batch_size: int = 1
    resolution: int | None = None
    bucket_step: int = 64
    seed: int = 0
    device: str = "cpu"
    full: bool = False
    train_text_encoder: bool = True
    prior_loss_weight: float = 1.0
    tokenizer: Path | None = None
    save_dtype: str | None = None  # LoRA: fp16 when None; --full: the base's dtypes when None
    output_name: str | None = None
    force: bool = False


@dataclass
class TrainResult:
    output: Path
    steps: int
    epochs: float  # passes over the data: steps / batches per epoch (16 steps of 34 batches = 0.47)
    batches_per_epoch: int
    losses: list[float]
    eval_loss_before: float
    eval_loss_after: float
    num_images: int
    num_reg_images: int
    buckets: dict[str, int]
    modules: int
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class _Sample:
    latent: torch.Tensor
    ids: torch.Tensor
    weight: float
    bucket: tuple[int, int]
    key: tuple[str, str, bool]


@contextmanager
def cpu_threads(model: StableDiffusion, device: torch.device) -> Iterator[None]:
    """One CPU thread for small models: their ops are too small to gain from threads, and thread
    start-up dominates (measured ×10 slower with 2 threads on a busy 2-core machine)."""
    with threads(1 if device.type == "cpu" and model.unet.cfg.model_channels < 320 else None):
        yield


def default_resolution(model: StableDiffusion) -> int:
    """512 for full-size SD1; 128 for smaller (test) models such as the bundled tiny base."""
    return 512 if model.unet.cfg.model_channels >= 320 else 128


def _prepare(model: StableDiffusion, items: list[Item], opts: TrainOptions, resolution: int, device: torch.device):
    buckets = make_buckets(resolution, opts.bucket_step)
    tok = make_tokenizer(model.text_encoder.cfg.vocab_size, opts.tokenizer, model.text_encoder.cfg.max_positions)
    cache: dict[Path, tuple[torch.Tensor, tuple[int, int]]] = {}
    samples = []
    with torch.no_grad():
        for item in items:
            if item.path not in cache:
                bucket = choose_bucket(image_size(item.path), buckets)
                img = load_image(item.path, bucket).unsqueeze(0).to(device)
                cache[item.path] = (model.vae.encode(img)[0], bucket)
            latent, bucket = cache[item.path]
            ids = torch.tensor(tok(item.caption), dtype=torch.long, device=device)
            samples.append(_Sample(latent, ids, opts.prior_loss_weight if item.is_reg else 1.0, bucket,
                                   (str(item.path), item.caption, item.is_reg)))
    return samples


def _batches(samples: list[_Sample], batch_size: int, gen: torch.Generator) -> list[list[_Sample]]:
    """One epoch: samples shuffled, grouped by bucket into batches, batches shuffled."""
    order = torch.randperm(len(samples), generator=gen).tolist()
    by_bucket: dict[tuple[int, int], list[_Sample]] = {}
    for i in order:
        by_bucket.setdefault(samples[i].bucket, []).append(samples[i])
    batches = [group[i:i + batch_size] for _, group in sorted(by_bucket.items()) for i in range(0, len(group), batch_size)]
    perm = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in perm]


def diffusion_loss(
    model: StableDiffusion, batch: list[_Sample], gen: torch.Generator, ac: torch.Tensor, device: torch.device,
    timesteps: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted ε-prediction MSE on one same-bucket batch (noise and timesteps drawn from ``gen``)."""
    x0 = torch.stack([s.latent for s in batch])
    ids = torch.stack([s.ids for s in batch])
    w = torch.tensor([s.weight for s in batch], device=device)
    noise = torch.randn(x0.shape, generator=gen).to(device)
    t = timesteps if timesteps is not None else torch.randint(0, len(ac), (len(batch),), generator=gen)
    t = t.to(device)
    a = ac.to(device)[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
    pred = model.unet(xt, t, model.text_encoder(ids))
    per = ((pred.float() - noise) ** 2).mean(dim=(1, 2, 3))
    return (per * w).sum() / len(batch)


def evaluation_loss(model: StableDiffusion, samples: list[_Sample], device: torch.device, seed: int = 1234) -> float:
    """Unweighted loss over every distinct sample at timesteps 200, 500, 800 with noise fixed by ``seed``."""
    ac = alphas_cumprod()
    seen: dict[tuple[str, str, bool], _Sample] = {}
    for s in samples:
        seen.setdefault(s.key, _Sample(s.latent, s.ids, 1.0, s.bucket, s.key))
    by_bucket: dict[tuple[int, int], list[_Sample]] = {}
    for s in seen.values():
        by_bucket.setdefault(s.bucket, []).append(s)
    total, count = 0.0, 0
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for _, group in sorted(by_bucket.items()):
            for t in (200, 500, 800):
                loss = diffusion_loss(model, group, gen, ac, device, torch.full((len(group),), t))
                total += float(loss) * len(group)
                count += len(group)
    return total / count


def _kohya_metadata(
    opts: TrainOptions, subsets: list[Subset], reg_subsets: list[Subset], resolution: int, buckets: dict[str, int],
    steps: int, epochs: int, batches_per_epoch: int, started: float, num_images: int, num_reg: int,
) -> dict[str, str]:
    network_args = conv_network_args(str(opts.conv_rank), str(opts.conv_alpha or opts.conv_rank)) if opts.conv_rank else None
    meta = {
        "ss_session_id": str(uuid.UUID(int=opts.seed)),
        "ss_training_started_at": str(started),
        "ss_output_name": opts.output_name or opts.output.stem,
        "ss_learning_rate": str(opts.learning_rate),
        "ss_text_encoder_lr": str(opts.learning_rate if opts.train_text_encoder else None),
        "ss_unet_lr": str(opts.learning_rate),
        "ss_num_train_images": str(num_images),
        "ss_num_reg_images": str(num_reg),
        "ss_num_batches_per_epoch": str(batches_per_epoch),
        "ss_num_epochs": str(epochs),
        "ss_epoch": str(epochs),
        "ss_steps": str(steps),
        "ss_max_train_steps": str(steps),
        "ss_batch_size_per_device": str(opts.batch_size),
        "ss_gradient_accumulation_steps": "1",
        "ss_lr_scheduler": "constant",
        "ss_lr_warmup_steps": "0",
        "ss_optimizer": "torch.optim.adamw.AdamW",
        **network_fields(str(opts.rank), str(opts.alpha)),
        "ss_network_train_unet_only": str(not opts.train_text_encoder),
        "ss_mixed_precision": "no",
        "ss_full_fp16": "False",
        **base_model_fields("sd1"),
        "ss_clip_skip": "None",
        "ss_max_token_length": "None",
        "ss_cache_latents": "True",
        "ss_seed": str(opts.seed),
        "ss_noise_offset": "None",
        "ss_prior_loss_weight": str(opts.prior_loss_weight),
        "ss_min_snr_gamma": "None",
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_enable_bucket": "True",
        "ss_min_bucket_reso": str(max(opts.bucket_step, resolution // 2 // opts.bucket_step * opts.bucket_step)),
        "ss_max_bucket_reso": str(resolution * 2),
        "ss_bucket_no_upscale": "False",
        "ss_bucket_info": json.dumps({"buckets": buckets}, sort_keys=True),
        "ss_dataset_dirs": json.dumps(dataset_dirs(subsets), sort_keys=True),
        "ss_reg_dataset_dirs": json.dumps(dataset_dirs(reg_subsets), sort_keys=True),
        "ss_tag_frequency": json.dumps(tag_frequency(subsets), sort_keys=True),
        "ss_keep_tokens": "0",
        "ss_shuffle_caption": "False",
        "ss_caption_dropout_rate": "0.0",
        "ss_sd_model_name": opts.base.name,
        "ss_vae_name": "None",
        "ss_training_comment": "trained with loratool",
    }
    if network_args:
        meta["ss_network_args"] = network_args
    subsets_meta = [
        {"img_count": len(sub.items), "num_repeats": sub.repeats, "color_aug": False, "flip_aug": False,
         "random_crop": False, "shuffle_caption": False, "keep_tokens": 0, "image_dir": sub.path.name,
         "class_tokens": sub.class_tokens, "is_reg": sub.is_reg}
        for sub in [*subsets, *reg_subsets]
    ]
    meta["ss_datasets"] = json.dumps([{
        "is_dreambooth": True, "batch_size_per_device": opts.batch_size, "num_train_images": num_images,
        "num_reg_images": num_reg, "resolution": [resolution, resolution], "enable_bucket": True,
        "min_bucket_reso": int(meta["ss_min_bucket_reso"]), "max_bucket_reso": resolution * 2,
        "tag_frequency": tag_frequency(subsets), "bucket_info": {"buckets": buckets}, "subsets": subsets_meta,
    }], sort_keys=True)
    return meta


def train(opts: TrainOptions, on_progress: Progress | None = None) -> TrainResult:
    """Train a LoRA (or the whole UNet with ``full``) and write it to ``opts.output``.

    ``on_progress(step, total, "loss 0.1234")`` is called after every optimiser step (:mod:`loratool.progress`).

    Raises:
        LoratoolError: bad data folder, unusable base, existing output without ``force``, no CUDA.
    """
    if opts.rank <= 0 and not opts.full:
        raise LoratoolError(f"--rank {opts.rank}: must be positive", hint="typical ranks are 4 to 128")
    if opts.save_dtype:
        dtypes.parse_cli(opts.save_dtype)
    container_for(opts.output)
    check_output(Path(opts.output), [opts.base, opts.data] + ([opts.reg_data] if opts.reg_data else []), opts.force)
    device = resolve_device(opts.device)
    started = now()
    subsets = read_subsets(opts.data)
    reg_subsets = read_subsets(opts.reg_data, is_reg=True) if opts.reg_data else []
    items = expand(subsets) + expand(reg_subsets)

    torch.manual_seed(opts.seed)
    model = load_model(opts.base, device)
    model.requires_grad_(False)
    with cpu_threads(model, device):
        return _train(model, opts, device, subsets, reg_subsets, items, started, on_progress)


def _train(
    model: StableDiffusion, opts: TrainOptions, device: torch.device, subsets: list[Subset], reg_subsets: list[Subset],
    items: list[Item], started: float, on_progress: Progress | None,
) -> TrainResult:
    resolution = opts.resolution or default_resolution(model)
    samples = _prepare(model, items, opts, resolution, device)
    buckets: dict[str, int] = {}
    for s in samples:
        key = f"{s.bucket[0]}x{s.bucket[1]}"
        buckets[key] = buckets.get(key, 0) + 1

    modules: dict[str, LoRAModule] = {}
    if opts.full:
        params = list(model.unet.parameters())
        model.unet.requires_grad_(True)
    else:
        modules = inject_lora(model, opts.rank, opts.alpha, opts.conv_rank, opts.conv_alpha, opts.train_text_encoder)
        params = [p for m in modules.values() for p in (m.lora_down, m.lora_up)]
    eval_before = evaluation_loss(model, samples, device)
    optimizer = torch.optim.AdamW(params, lr=opts.learning_rate, weight_decay=0.01)
    gen = torch.Generator().manual_seed(opts.seed)
    ac = alphas_cumprod()
    batches_per_epoch = len(_batches(samples, opts.batch_size, torch.Generator().manual_seed(0)))
    total = opts.steps if opts.steps is not None else opts.epochs * batches_per_epoch
    losses: list[float] = []
    step, epoch = 0, 0
    model.train()
    while step < total:
        epoch += 1
        for batch in _batches(samples, opts.batch_size, gen):
            loss = diffusion_loss(model, batch, gen, ac, device)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            losses.append(float(loss.detach()))
            if on_progress:
                on_progress(step, total, f"loss {losses[-1]:.4f}")
            if step >= total:
                break
    model.eval()
    eval_after = evaluation_loss(model, samples, device)
    num_images = sum(len(s.items) for s in subsets)
    num_reg = sum(len(s.items) for s in reg_subsets)
    meta = _kohya_metadata(opts, subsets, reg_subsets, resolution, buckets, step, epoch, batches_per_epoch, started,
                           num_images, num_reg)
    meta["ss_training_finished_at"] = str(now())
    if opts.full:
        meta = {"loratool.trained": json.dumps({k: meta[k] for k in ("ss_steps", "ss_learning_rate", "ss_seed",
                                                                        "ss_sd_model_name", "ss_tag_frequency")})}
        save_dtype = dtypes.to_torch(dtypes.parse_cli(opts.save_dtype)) if opts.save_dtype else None
        out = write_full_checkpoint(model, opts.base, opts.output, meta, save_dtype, opts.force)
    else:
        tensors = lora_tensors(modules, dtypes.to_torch(dtypes.parse_cli(opts.save_dtype or "fp16")))
        out = save_adapter(opts.output, tensors, meta, inputs=[opts.base], force=opts.force)
    epochs = round(step / max(1, batches_per_epoch), 2)
    return TrainResult(out, step, epochs, batches_per_epoch, losses, eval_before, eval_after, num_images, num_reg, buckets,
                       len(modules), meta)


def write_full_checkpoint(
    model: StableDiffusion, base: str | os.PathLike, output: str | os.PathLike, metadata: dict[str, str],
    dtype: torch.dtype | None = None, force: bool = False,
) -> Path:
    """Stream a full checkpoint: every key of ``base`` in its order, UNet weights taken from ``model``.

    Tensors keep the base's dtype unless ``dtype`` is given (then float weights of the UNet use it).
    """
    src = open_file(base)
    try:
        tuned = {f"model.diffusion_model.{k}": v for k, v in model.unet.state_dict().items()}
        specs = {}
        for k in src.keys():
            spec = src.spec(k)
            if k in tuned and dtype is not None:
                spec = type(spec)(spec.shape, dtypes.name_of(dtype))
            specs[k] = spec
        with open_writer(output, specs, metadata, inputs=[base], force=force, wrap=True) as w:
            for k in src.keys():
                w.write(k, tuned[k].detach().float() if k in tuned else src.get(k))
            return w.finalize(metadata if isinstance(w, SafetensorsWriter) else None)
    finally:
        src.close()
