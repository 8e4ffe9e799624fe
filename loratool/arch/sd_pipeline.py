"""The non-weight files of a diffusers pipeline folder, derived from the weights themselves.

Every size in the ``config.json`` files is read from the tensor shapes, so a real SD1/SD2/SDXL file
and a genuinely small model of the same architecture both get configs that build exactly their
weights. Values a checkpoint does not store follow one rule each, stated where it is computed:

* GroupNorm groups: ``gcd(32, channels)`` (32 for every real SD model; 1 for a 5-channel toy);
* UNet heads: SD1 has 8 heads (``gcd(8, channels)``); SD2/SDXL have 64-wide heads
  (``channels / gcd(64, channels)`` heads); text-encoder heads ``gcd(12|16|20, width)``;
* the scheduler: the checkpoint's own ``betas`` buffer when it holds a schedule (0 < β < 1, rising:
  its start, end, count, and whether √β is linear), else SD's 0.00085 → 0.012 scaled-linear schedule; prediction type
  ``v_prediction`` for SD2 (the 768-v releases) and SDXL files with a ``v_pred`` key, else ``epsilon``;
* tokenizers: CLIP's BPE (shipped with loratool), cut to the text encoder's vocabulary size.

The folder then loads with ``StableDiffusionPipeline.from_pretrained(folder)`` (or the XL pipeline)
offline, with no extra arguments.
"""

from __future__ import annotations

import json
from math import gcd
from pathlib import Path

from ..assets import write_clip_tokenizer
from ..io.source import TensorSpec

DIFFUSERS_VERSION = "0.32.1"  # the diffusers release whose folder layout the tables follow
PREDICTION_TYPES = ("epsilon", "v_prediction")

_TORCH_DTYPE = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
# (class, heads of the real model, activation) per text encoder
_TEXT = {
    ("sd1", "text_encoder"): ("CLIPTextModel", 12, "quick_gelu"),
    ("sd2", "text_encoder"): ("CLIPTextModel", 16, "gelu"),
    ("sdxl", "text_encoder"): ("CLIPTextModel", 12, "quick_gelu"),
    ("sdxl", "text_encoder_2"): ("CLIPTextModelWithProjection", 20, "gelu"),
}
# OpenCLIP tokenizers pad with "!", CLIP-L's with <|endoftext|> (as the released pipelines ship them)
_PAD = {("sd2", "text_encoder"): "!", ("sdxl", "text_encoder_2"): "!"}
_VAE_SCALE = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025}
_TOKENIZER_OF = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}


def _count(specs: dict[str, TensorSpec], prefix: str, suffix: str) -> int:
    return len({k[len(prefix):].split(".", 1)[0] for k in specs if k.startswith(prefix) and k.endswith(suffix)})


def _dtype_of(specs: dict[str, TensorSpec]) -> str:
    floats = [s.dtype for s in specs.values() if s.dtype in _TORCH_DTYPE]
    return _TORCH_DTYPE[max(set(floats), key=floats.count)] if floats else "float32"


def default_prediction_type(arch: str, source_keys) -> str:
    """``v_prediction`` for SD2 (768-v releases) and SDXL files carrying a ``v_pred`` key, else ``epsilon``."""
    if arch == "sd2" or (arch == "sdxl" and "v_pred" in source_keys):
        return "v_prediction"
    return "epsilon"


def component_config(arch: str, comp: str, specs: dict[str, TensorSpec], all_specs: dict[str, TensorSpec],
                     prediction_type: str = "epsilon") -> dict:
    """``config.json`` of one component; ``specs`` are its keys (without the folder), ``all_specs`` every
    ``component/key`` of the folder (SDXL's UNet reads the pooled width from ``text_encoder_2``)."""
    if comp == "unet":
        return _unet_config(arch, specs, all_specs, prediction_type)
    if comp == "vae":
        return _vae_config(arch, specs)
    return _text_config(arch, comp, specs)


def _text_config(arch: str, comp: str, specs: dict[str, TensorSpec]) -> dict:
    cls, heads, act = _TEXT[(arch, comp)]
    vocab, width = specs["text_model.embeddings.token_embedding.weight"].shape
    cfg = {
        "_name_or_path": "",
        "architectures": [cls],
        "model_type": "clip_text_model",
        "hidden_act": act,
        "hidden_size": width,
        "vocab_size": vocab,
        "num_attention_heads": gcd(heads, width),
        "num_hidden_layers": _count(specs, "text_model.encoder.layers.", ".weight"),
        "intermediate_size": specs["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        "max_position_embeddings": specs["text_model.embeddings.position_embedding.weight"].shape[0],
        "layer_norm_eps": 1e-05,
        "bos_token_id": vocab - 2,
        "eos_token_id": 2,  # transformers' legacy rule: the pooled token is argmax(input_ids), i.e. <|endoftext|>
        "pad_token_id": 1,
        "projection_dim": specs["text_projection.weight"].shape[0] if "text_projection.weight" in specs else width,
        "torch_dtype": _dtype_of(specs),
    }
    return cfg


def _unet_config(arch: str, specs: dict[str, TensorSpec], all_specs: dict[str, TensorSpec], prediction_type: str) -> dict:
    levels = _count(specs, "down_blocks.", ".weight")
    attn_down = [any(k.startswith(f"down_blocks.{i}.attentions.") for k in specs) for i in range(levels)]
    attn_up = [any(k.startswith(f"up_blocks.{i}.attentions.") for k in specs) for i in range(levels)]
    channels = [specs[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(levels)]
    mc = specs["conv_in.weight"].shape[0]
    if arch == "sd1":
        heads: int | list[int] = gcd(8, mc)
    else:
        heads = [c // gcd(64, c) for c in channels]
    layers_per_block = _count(specs, "down_blocks.0.resnets.", ".weight")
    cfg: dict = {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "attention_head_dim": heads,
        "block_out_channels": channels,
        "center_input_sample": False,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn_down],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in attn_up],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": specs["conv_in.weight"].shape[1],
        "out_channels": specs["conv_out.weight"].shape[0],
        "layers_per_block": layers_per_block,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": gcd(32, mc),
        "sample_size": {"sd1": 64, "sd2": 96 if prediction_type == "v_prediction" else 64, "sdxl": 128}[arch],
    }
    first = attn_down.index(True) if True in attn_down else None
    prefix = f"down_blocks.{first}.attentions.0." if first is not None else "mid_block.attentions.0."
    cfg["cross_attention_dim"] = specs[prefix + "transformer_blocks.0.attn2.to_k.weight"].shape[1]
    cfg["use_linear_projection"] = len(specs[prefix + "proj_in.weight"].shape) == 2
    cfg["transformer_layers_per_block"] = [
        max(1, _count(specs, f"down_blocks.{i}.attentions.0.transformer_blocks.", ".weight")) for i in range(levels)
    ]
    if "add_embedding.linear_1.weight" in specs:
        total = specs["add_embedding.linear_1.weight"].shape[1]
        pooled = all_specs["text_encoder_2/text_projection.weight"].shape[0]
        cfg.update({
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": (total - pooled) // 6,  # six size/crop conditions, each a sinusoidal embedding
            "projection_class_embeddings_input_dim": total,
        })
    return cfg


def _vae_config(arch: str, specs: dict[str, TensorSpec]) -> dict:
    levels = _count(specs, "encoder.down_blocks.", ".weight")
    channels = [specs[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(levels)]
    cfg: dict = {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu",
        "block_out_channels": channels,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "layers_per_block": _count(specs, "encoder.down_blocks.0.resnets.", ".weight"),
        "norm_num_groups": gcd(32, channels[0]),
        "in_channels": specs["encoder.conv_in.weight"].shape[1],
        "out_channels": specs["decoder.conv_out.weight"].shape[0],
        "latent_channels": specs["post_quant_conv.weight"].shape[0],
        "sample_size": {"sd1": 512, "sd2": 768, "sdxl": 1024}[arch],
        "scaling_factor": _VAE_SCALE[arch],
    }
    if arch == "sdxl":
        cfg["force_upcast"] = True
    return cfg


def scheduler_config(arch: str, betas=None, prediction_type: str = "epsilon") -> dict:
    """The scheduler SD's own pipelines ship (PNDM for SD1/SD2, Euler for SDXL) with the checkpoint's schedule."""
    start, end, count, kind = 0.00085, 0.012, 1000, "scaled_linear"
    b = betas.double().reshape(-1) if betas is not None else None
    if b is not None and b.numel() > 1 and bool(((b > 0) & (b < 1)).all()) and bool((b[1:] >= b[:-1]).all()):
        start, end, count = float(b[0]), float(b[-1]), int(b.numel())
        import torch

        scaled = torch.linspace(start**0.5, end**0.5, count, dtype=torch.float64) ** 2
        linear = torch.linspace(start, end, count, dtype=torch.float64)
        kind = "scaled_linear" if float((b - scaled).abs().max()) <= float((b - linear).abs().max()) else "linear"
        start, end = round(start, 8), round(end, 8)
    common = {
        "_diffusers_version": DIFFUSERS_VERSION,
        "beta_start": start,
        "beta_end": end,
        "beta_schedule": kind,
        "num_train_timesteps": count,
        "prediction_type": prediction_type,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "trained_betas": None,
    }
    if arch == "sdxl":
        return {"_class_name": "EulerDiscreteScheduler", "interpolation_type": "linear", "sample_max_value": 1.0,
                "timestep_spacing": "leading", "use_karras_sigmas": False, **common}
    return {"_class_name": "PNDMScheduler", "clip_sample": False, **common}


def model_index(arch: str, components: list[str]) -> dict:
    """``model_index.json``: every component we write, scheduler and tokenizers included, the rest ``null``."""
    classes = {
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler" if arch == "sdxl" else "PNDMScheduler"],
    }
    index: dict = {
        "_class_name": "StableDiffusionXLPipeline" if arch == "sdxl" else "StableDiffusionPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
    }
    if arch == "sdxl":
        index["force_zeros_for_empty_prompt"] = True
    else:
        index.update({"safety_checker": [None, None], "requires_safety_checker": False})
    index.update({c: classes[c] for c in components})
    return index


def write_pipeline_files(root: Path, arch: str, specs_by_comp: dict[str, dict[str, TensorSpec]], betas=None,
                         prediction_type: str = "epsilon") -> list[str]:
    """Write every config, the scheduler, the tokenizers and ``model_index.json`` into ``root``; returns
    the files written (relative to ``root``)."""
    all_specs = {f"{c}/{k}": s for c, specs in specs_by_comp.items() for k, s in specs.items()}
    files: list[str] = []
    components = list(specs_by_comp)

    def dump(rel: str, data: dict) -> None:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        files.append(rel)

    for comp, specs in specs_by_comp.items():
        dump(f"{comp}/config.json", component_config(arch, comp, specs, all_specs, prediction_type))
        if comp in _TOKENIZER_OF:
            vocab = specs["text_model.embeddings.token_embedding.weight"].shape[0]
            positions = specs["text_model.embeddings.position_embedding.weight"].shape[0]
            tok = _TOKENIZER_OF[comp]
            names = write_clip_tokenizer(root / tok, _PAD.get((arch, comp), "<|endoftext|>"), positions, vocab)
            files += [f"{tok}/{n}" for n in names]
            components.append(tok)
    dump("scheduler/scheduler_config.json", scheduler_config(arch, betas, prediction_type))
    components.append("scheduler")
    dump("model_index.json", model_index(arch, components))
    return files
