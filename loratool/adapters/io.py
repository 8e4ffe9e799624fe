"""Adapter files ↔ modules: the only code that reads or writes adapter key names.

Reading: every key of a file is split into (module, role, naming) by the suffix tables below and
resolved to a :class:`~loratool.arch.ModuleTarget` of an architecture (:func:`index_adapter`); the
file's shape config is read off its factors (:func:`sized_index`); :func:`best_arch` picks the
architecture; :func:`load_adapter` returns every module with its tensors.

Writing: :func:`native_keys` and :func:`module_tensors` give a module's keys in kohya, PEFT or
diffusers naming; :func:`save_adapter` writes a file (hashes in the metadata).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple

if TYPE_CHECKING:
    import torch

    from ..io.source import TensorSource

from ..arch import ARCHES, DENOISERS, Arch, ModuleTarget, module_index, shape_rules
from ..arch.dims import ShapeConfig, Solution
from ..errors import DetectionError, InternalError, MappingError, listing
from ..metadata.kohya import arch_from_metadata
from .families import AdapterModule, FamilyName, _prod, factor_problem, family_of

KOHYA_SUFFIXES: dict[str, str] = {
    "lora_down.weight": "down",
    "lora_up.weight": "up",
    "lora_mid.weight": "mid",
    "alpha": "alpha",
    "dora_scale": "dora_scale",
    "hada_w1_a": "hada_w1_a",
    "hada_w1_b": "hada_w1_b",
    "hada_w2_a": "hada_w2_a",
    "hada_w2_b": "hada_w2_b",
    "hada_t1": "hada_t1",
    "hada_t2": "hada_t2",
    "lokr_w1": "lokr_w1",
    "lokr_w1_a": "lokr_w1_a",
    "lokr_w1_b": "lokr_w1_b",
    "lokr_w2": "lokr_w2",
    "lokr_w2_a": "lokr_w2_a",
    "lokr_w2_b": "lokr_w2_b",
    "lokr_t2": "lokr_t2",
    "diff": "diff",
    "diff_b": "diff_b",
}
PEFT_SUFFIXES: dict[str, str] = {
    "lora_A.weight": "down",
    "lora_B.weight": "up",
    "lora_B.bias": "up_bias",  # LoRA with a bias (PEFT lora_bias; BFL control LoRAs)
    "lora_A.bias": "down_bias",  # read as up_bias + up @ down_bias (exact), never kept
    "lora_magnitude_vector": "dora_scale",
    "lora_magnitude_vector.weight": "dora_scale",
    "alpha": "alpha",
}
DIFFUSERS_SUFFIXES: dict[str, str] = {
    "lora.down.weight": "down",
    "lora.up.weight": "up",
    "lora_linear_layer.down.weight": "down",
    "lora_linear_layer.up.weight": "up",
    "alpha": "alpha",
}
XLABS_SUFFIXES: dict[str, str] = {  # x-flux LoRALinearLayer: no alpha in the file (scale 1)
    "down.weight": "down",
    "up.weight": "up",
}
Naming = Literal["kohya", "peft", "diffusers", "xlabs", "comfyui"]
SUFFIXES_BY_NAMING: dict[Naming, dict[str, str]] = {
    "kohya": KOHYA_SUFFIXES, "peft": PEFT_SUFFIXES, "diffusers": DIFFUSERS_SUFFIXES, "xlabs": XLABS_SUFFIXES
}
WRITABLE_NAMINGS: tuple[Naming, ...] = ("kohya", "peft", "diffusers", "comfyui")


class KeyParts(NamedTuple):
    """A native adapter key split: the module's native name, the role, the naming whose suffix matched."""

    module: str
    role: str
    naming: Naming


@lru_cache(maxsize=1 << 16)  # pure; detection asks it the same keys once per architecture
def split_key(key: str) -> KeyParts | None:
    """``native key → (module name, role, naming)``, or None when no known suffix matches.

    kohya keys look like ``lora_unet_x.lora_down.weight``; PEFT ``unet.x.lora_A.weight``;
    diffusers ``unet.x.lora.down.weight``.
    """
    best: KeyParts | None = None
    for naming, table in SUFFIXES_BY_NAMING.items():
        for suffix, role in table.items():
            if key.endswith("." + suffix):
                module = key[: -len(suffix) - 1]
                if best is None or len(suffix) > len(key) - len(best[0]) - 1:
                    best = KeyParts(module, role, naming)
    return best


@dataclass
class AdapterIndex:
    """Where every key of an adapter file goes: per target module name, role → native key."""

    arch: Arch
    naming: Naming
    modules: dict[str, dict[str, str]]
    targets: dict[str, ModuleTarget]
    families: dict[str, FamilyName]
    unmapped: list[str]
    solution: Solution | None = None  # the shape config read off the factors (:func:`sized_index`); targets sized to it
    proportional: frozenset[str] = frozenset()  # modules whose sizes keep the standard proportions of that config
    replaced: dict[str, str] = field(default_factory=dict)  # single-file key → native key of a tensor given in full

    def require_all_mapped(self, path: str = "", allow_unmapped: bool = False) -> None:
        if self.unmapped and not allow_unmapped:
            raise MappingError(
                f"{path}{': ' if path else ''}{len(self.unmapped)} keys map to no {self.arch} module: "
                f"{listing(self.unmapped)}",
                hint="check --arch, or pass --allow-unmapped to ignore them (they are listed, not merged)",
            )


def _native_module_names(module: str, naming: str) -> list[str]:
    if naming == "kohya":
        return [module]
    # PEFT files saved from a bare UNet carry ``base_model.model.`` instead of the component prefix.
    names = [module]
    if module.startswith("base_model.model."):
        rest = module[len("base_model.model."):]
        names += ["unet." + rest, "transformer." + rest]
    return names


def index_adapter(keys: Iterable[str], arch: str) -> AdapterIndex:
    """Map every adapter key of a file to (target module, role) for ``arch``.

    Keys with no known suffix or whose module is not in ``arch``'s tables go to ``unmapped``.
    """
    index = module_index(arch)
    modules: dict[str, dict[str, str]] = {}
    targets: dict[str, ModuleTarget] = {}
    namings: dict[str, int] = {}
    unmapped: list[str] = []
    replaced: dict[str, str] = {}
    whole = replaceable_keys(arch)
    for key in keys:
        bare = key.removeprefix("diffusion_model.")
        if bare in whole:  # a BFL control LoRA's own norm scales, given in full
            replaced[bare] = key
            continue
        parsed = split_key(key)
        if parsed is None:
            unmapped.append(key)
            continue
        module, role, naming = parsed
        hit = None
        for name in _native_module_names(module, naming):
            if name in index:
                hit = index[name][1]
                break
        if hit is None:
            unmapped.append(key)
            continue
        roles = modules.setdefault(hit.name, {})
        if role in roles:
            raise MappingError(f"two keys give {hit.name} its {role}: {roles[role]} and {key}")
        roles[role] = key
        targets[hit.name] = hit
        if role != "alpha":
            namings[naming] = namings.get(naming, 0) + 1
    families = {}
    for name, roles in list(modules.items()):
        if set(roles) <= {"alpha", "dora_scale"}:
            # an alpha with no factors is a leftover, not a module
            unmapped.extend(roles.values())
            del modules[name]
            del targets[name]
            continue
        families[name] = family_of(roles)
    naming = max(namings, key=namings.get) if namings else "kohya"
    if replaced and not modules:  # full tensors alone are a (partial) checkpoint, not an adapter
        unmapped.extend(replaced.values())
        replaced = {}
    return AdapterIndex(arch, naming, modules, targets, families, sorted(unmapped), replaced=replaced)


def replaceable_keys(arch: str) -> frozenset[str]:
    """Single-file keys an adapter may carry in full, replacing the base's tensor: FLUX.1's q/k norm scales
    (BFL control LoRAs ship their own ``…norm.query_norm.scale`` / ``key_norm.scale``)."""
    from ..arch import checkpoint_layout

    if arch != "flux1":
        return frozenset()
    return frozenset(k for k in checkpoint_layout(arch, "ldm") if k.endswith(("query_norm.scale", "key_norm.scale")))


def shapes_fit(family: str, shapes: Mapping[str, tuple[int, ...]], target: ModuleTarget) -> bool:
    """Do a module's factor shapes fit its target weight (sized to the file's config)? No tensor data needed."""
    ts = target.target_shape
    out_f, in_f = ts[0], _prod(ts[1:])
    in_ch = ts[1] if len(ts) > 1 else 1
    if family == "lora":
        down, up = shapes.get("down"), shapes.get("up")
        if down is None or up is None or len(down) < 2:
            return False
        return up[0] == out_f and down[1] == in_ch
    if family == "loha":
        a, b = shapes.get("hada_w1_a"), shapes.get("hada_w1_b")
        if a is None or b is None:
            return False
        if "hada_t1" in shapes:
            return a[1] == out_f and b[1] == in_ch
        return a[0] == out_f and _prod(b[1:]) == in_f
    if family == "lokr":
        dims = _lokr_dims(shapes)
        if dims is None:
            return False
        a, b, c, e = dims
        return a * b == out_f and c * e == in_f
    if family == "full":
        d = shapes.get("diff")
        return d is not None and _prod(d) == _prod(ts)
    return False


def _lokr_dims(shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, int, int, int] | None:
    """``(a, b, c, e)`` of a LoKr module from its factor shapes alone: ``out = a·b`` and
    ``in·kh·kw = c·e`` (w1 is (a, c); w2 is (b, d[, kh, kw]) with e = d·kh·kw)."""
    try:
        if "lokr_w1" in shapes:
            a, c = shapes["lokr_w1"][0], shapes["lokr_w1"][1]
        else:
            a, c = shapes["lokr_w1_a"][0], shapes["lokr_w1_b"][1]
        if "lokr_w2" in shapes:
            b, e = shapes["lokr_w2"][0], _prod(shapes["lokr_w2"][1:])
        elif "lokr_t2" in shapes:
            b, e = shapes["lokr_w2_a"][1], shapes["lokr_w2_b"][1] * _prod(shapes["lokr_t2"][2:])
        else:
            b, e = shapes["lokr_w2_a"][0], _prod(shapes["lokr_w2_b"][1:])
    except (KeyError, IndexError):
        return None
    return a, b, c, e


def _factor_dims(family: str, shapes: Mapping[str, tuple[int, ...]], target_shape: tuple[int, ...]) -> tuple[int, int] | None:
    """``(out, in)`` sizes of the weight a module's factors make (kernel sizes are constants of the layer)."""
    kernel = _prod(target_shape[2:])
    flat: tuple[int, int] | None = None
    if family == "lora" and "up" in shapes and "down" in shapes and len(shapes["down"]) > 1:
        return shapes["up"][0], shapes["down"][1]
    if family == "loha" and "hada_w1_a" in shapes and "hada_w1_b" in shapes:
        a, b = shapes["hada_w1_a"], shapes["hada_w1_b"]
        if "hada_t1" in shapes:
            return (a[1], b[1]) if len(a) > 1 and len(b) > 1 else None
        flat = a[0], _prod(b[1:])
    elif family == "lokr" and (dims := _lokr_dims(shapes)):
        flat = dims[0] * dims[1], dims[2] * dims[3]
    elif family == "full" and "diff" in shapes and len(shapes["diff"]) > 1:
        return shapes["diff"][0], shapes["diff"][1]
    if flat is None or flat[1] % kernel:
        return None
    return flat[0], flat[1] // kernel


def _observations(index: AdapterIndex, specs: Mapping[str, object]):
    """``(name, component, standard (out, in), actual (out, in), address)`` per module whose factors give both
    sizes."""
    for name, roles in index.modules.items():
        t = index.targets[name]
        ts = t.target_shape
        dims = _factor_dims(index.families[name], {r: tuple(specs[k].shape) for r, k in roles.items()}, ts)
        if dims is not None and len(ts) > 1:
            yield name, t.component, ts[:2], dims, t.address


def sized_index(index: AdapterIndex, specs: Mapping[str, object]) -> AdapterIndex:
    """Read the adapter's shape config off its factor shapes and size every target to it.

    A LoRA for the released model solves to the standard config; one for a smaller model of the same
    layout to that model's config. Idempotent: an index that is already sized is returned as it is.
    """
    if index.solution is not None:
        return index
    rules = shape_rules(index.arch)
    seen = list(_observations(index, specs))
    solution = rules.solve((comp, std, actual, key) for _, comp, std, actual, key in seen)
    kept = frozenset(name for name, comp, std, actual, key in seen
                     if rules.in_proportion(solution, comp, std, actual, key))
    targets = {n: t.sized(solution.config) for n, t in index.targets.items()}
    return replace(index, targets=targets, solution=solution, proportional=kept)


def fit_count(index: AdapterIndex, specs: Mapping[str, object]) -> int:
    """How many modules have factor shapes that fit their targets in the file's config, in the
    standard proportions of the architecture (see :class:`~loratool.arch.dims.Solution`)."""
    index = sized_index(index, specs)
    n = 0
    for name, roles in index.modules.items():
        shapes = {r: tuple(specs[k].shape) for r, k in roles.items()}
        if name in index.proportional and shapes_fit(index.families[name], shapes, index.targets[name]):
            n += 1
    return n


class ArchChoice(NamedTuple):
    """:func:`best_arch`'s answer: the architecture, the file indexed (and sized) for it, every (arch, score)."""

    arch: Arch
    index: AdapterIndex
    scores: list[tuple[Arch, float]]


def best_arch(
    specs: Mapping[str, object], arches: Iterable[Arch] = ARCHES, metadata: Mapping[str, str] | None = None
) -> ArchChoice:
    """Pick the architecture an adapter is for, from its key names, shapes and metadata.

    Evidence, strongest first: the share of keys whose names map to a module of the arch;
    the share of modules whose factor shapes fit their target weights in the shape config read off
    the file, keeping the architecture's standard proportions; the base model the training tool
    recorded in the metadata (a small bonus that separates SD1 from SD2 when only UNet modules with
    foreign sizes are present).

    Args:
        specs: key → anything with a ``.shape`` (a :class:`~loratool.io.source.TensorSpec`).
        metadata: the file's metadata, if any.

    Returns:
        (arch, index, [(arch, score)] best first), scores in [0, 1.1].

    Raises:
        DetectionError: two architectures score the same, or none maps anything.
    """
    keys = list(specs)
    recorded = arch_from_metadata(metadata or {})
    scored = []
    for arch in arches:
        idx = sized_index(index_adapter(keys, arch), specs)
        fitting = fit_count(idx, specs)
        mapped_keys = sum(len(r) for r in idx.modules.values()) + len(idx.replaced)
        name_score = mapped_keys / max(1, len(keys))
        shape_score = fitting / max(1, len(idx.modules))
        score = name_score * (0.5 + 0.5 * shape_score) + (0.1 if recorded == arch and name_score else 0.0)
        scored.append((score, arch, idx))
    scored.sort(key=lambda t: -t[0])
    if scored[0][0] == 0:
        raise DetectionError(
            "no SD1/SD2/SDXL module names found among the adapter keys",
            hint="is this a LoRA for another model family? pass --arch to force one",
        )
    if len(scored) > 1 and abs(scored[0][0] - scored[1][0]) < 1e-9:
        raise DetectionError(
            f"adapter keys fit {scored[0][1]} and {scored[1][1]} equally well",
            hint="name the base model with --arch sd1|sd2|sdxl",
        )
    return ArchChoice(scored[0][1], scored[0][2], [(a, round(sc, 4)) for sc, a, _ in scored])


@dataclass
class LoadedAdapter:
    """An adapter file resolved against one architecture: every module with its tensors."""

    arch: Arch
    naming: Naming
    modules: dict[str, AdapterModule]
    unmapped: list[str]
    scores: list[tuple[str, float]]
    metadata: dict[str, str]
    path: str = ""
    config: ShapeConfig | None = None  # the shape config read off the factors; every target is sized to it
    replaced: dict[str, torch.Tensor] = field(default_factory=dict)  # single-file key → tensor given in full

    @property
    def is_control(self) -> bool:
        """A BFL control LoRA (FLUX Depth/Canny): LoRA biases or norm scales given in full."""
        return bool(self.replaced) or any("up_bias" in m.tensors for m in self.modules.values())

    @property
    def families(self) -> set[str]:
        return {m.family for m in self.modules.values()}


def load_adapter(source: TensorSource, arch: str | None = None, allow_unmapped: bool = False) -> LoadedAdapter:
    """Read every module of an adapter source (any naming) into memory, resolved to targets.

    Args:
        source: a :class:`~loratool.io.source.TensorSource` of a LoRA/LyCORIS file.
        arch: force ``sd1`` / ``sd2`` / ``sdxl`` instead of detecting it from keys and shapes.
        allow_unmapped: keep going when some keys map to no module (they are listed in ``unmapped``).

    Raises:
        DetectionError: the architecture is ambiguous or nothing maps.
        MappingError: keys map nowhere (unless ``allow_unmapped``), or factor shapes do not fit a target.
    """
    specs = {k: source.spec(k) for k in source.keys()}
    if arch is None:
        arch, index, scores = best_arch(specs, metadata=source.metadata)
    else:
        index = index_adapter(list(specs), arch)
        scores = [(arch, 1.0)]
    index.require_all_mapped(str(source.path), allow_unmapped)
    index = sized_index(index, specs)
    modules: dict[str, AdapterModule] = {}
    misfit = []
    broken = []
    for name, roles in index.modules.items():
        problem = factor_problem(index.families[name], {r: tuple(specs[k].shape) for r, k in roles.items()})
        if problem:
            broken.append(f"{name} {problem}")
    if broken:
        raise MappingError(
            f"{source.path}: {len(broken)} modules have broken factors: {listing(broken, 3)}",
            hint="the file is damaged or was edited by hand; get a fresh copy",
        )
    split_qkv = trained_split_qkv(source.metadata)
    for name, roles in index.modules.items():
        fam = index.families[name]
        shapes = {r: tuple(specs[k].shape) for r, k in roles.items()}
        if not shapes_fit(fam, shapes, index.targets[name]):
            misfit.append(f"{name} {shapes} vs {index.targets[name].target_shape}")
            continue
        module = AdapterModule(index.targets[name], fam, {r: source.get(k) for r, k in roles.items()}, dict(roles))
        if "down_bias" in module.tensors:
            module = _fold_down_bias(module)
        if _in_bfl_order(index.arch, roles):
            module = swap_halves(module)
        if split_qkv:
            module = _split_qkv_alpha(module, index.solution.config if index.solution else None)
        modules[name] = module
    if misfit:
        raise MappingError(
            f"{source.path}: {len(misfit)} modules do not fit the {arch} weights: {listing(misfit, 3)}",
            hint="the adapter is for another architecture; check --arch",
        )
    metadata = dict(source.metadata)
    if split_qkv:
        metadata = without_split_qkv(metadata)
    replaced = {address: source.get(key) for address, key in index.replaced.items()}
    return LoadedAdapter(arch, index.naming, modules, index.unmapped, scores, metadata, str(source.path),
                         index.solution.config if index.solution else None, replaced)


def _fold_down_bias(module: AdapterModule) -> AdapterModule:
    """``lora_A.bias`` b_A adds ``up @ b_A`` to the layer's output: the same as an up bias (exact)."""
    t = dict(module.tensors)
    down_bias = t.pop("down_bias").float()
    up = t["up"].float().reshape(t["up"].shape[0], -1)
    extra = up @ down_bias.reshape(-1)
    t["up_bias"] = (t["up_bias"].float() + extra if "up_bias" in t else extra).to(t["up"].dtype)
    return AdapterModule(module.target, module.family, t, module.keys)


def _in_bfl_order(arch: str, roles: Mapping[str, str]) -> bool:
    """Is the module stored under a name whose rows are in the single file's order where the target keeps the
    diffusers order (FLUX ``lora_unet_final_layer_adaLN_modulation_1`` vs ``norm_out.linear``)?"""
    if arch != "flux1":
        return False
    from ..arch.flux_naming import BFL_ORDER_NAMES

    parsed = split_key(next(k for r, k in roles.items() if r != "alpha"))
    return parsed is not None and parsed.module in BFL_ORDER_NAMES


def swap_halves(module: AdapterModule, target: ModuleTarget | None = None) -> AdapterModule:
    """The module whose ΔW has the two row halves of ``module``'s swapped (an involution), exactly: LoRA swaps
    the up's row halves, LoHa both ``w*_a``; other families become their dense ΔW."""
    from .math import delta
    from .math import swap_row_halves as swap

    target = target or module.target
    t = module.tensors
    if module.family == "lora":
        rows = {"up": swap(t["up"]), **({"up_bias": swap(t["up_bias"])} if "up_bias" in t else {})}
        return AdapterModule(target, "lora", {**t, **rows}, module.keys)
    if module.family == "loha" and "hada_t1" not in t:
        return AdapterModule(target, "loha", {**t, "hada_w1_a": swap(t["hada_w1_a"]), "hada_w2_a": swap(t["hada_w2_a"])},
                             module.keys)
    return AdapterModule(target, "full", {"diff": swap(delta(module))}, module.keys)


def trained_split_qkv(metadata: Mapping[str, str]) -> bool:
    """Was the file trained by sd-scripts with ``split_qkv`` (its ``ss_network_args`` say so)?"""
    from ..metadata import parse_json_field

    args = parse_json_field(metadata, "ss_network_args")
    return isinstance(args, dict) and str(args.get("split_qkv", "")).lower() in ("true", "1")


def without_split_qkv(metadata: Mapping[str, str]) -> dict[str, str]:
    """The metadata of a ``split_qkv`` file once its alphas are read in loratool's convention
    (:func:`_split_qkv_alpha`): ``split_qkv`` leaves ``ss_network_args`` so that a file written from it,
    which stores those alphas, is read with the plain ``alpha / rank`` rule by every tool, loratool included."""
    import json

    from ..metadata import parse_json_field

    out = dict(metadata)
    args = {k: v for k, v in parse_json_field(metadata, "ss_network_args").items() if k != "split_qkv"}
    out["ss_network_args"] = json.dumps(args)
    return out


def _split_qkv_alpha(module: AdapterModule, config: ShapeConfig | None) -> AdapterModule:
    """kohya ``split_qkv`` files (FLUX; ``ss_network_args`` has ``split_qkv``): a fused module stores its p parts'
    LoRAs as one — downs stacked (p·r rows), the up block-diagonal — with the *per-part* alpha, and sd-scripts
    scales by ``alpha / r``.
    Read with the usual ``alpha / rank`` (rank p·r) that would be p times too small, so such a module's
    alpha is taken as ``p · alpha`` in memory: the same ΔW as sd-scripts applies, in the one convention
    every other command uses (a file written from it stores that alpha, and is exact in any loader)."""
    from ..arch import fused_parts as part_targets

    parts = part_targets(module.target)
    t = module.tensors
    if module.family != "lora" or len(parts) < 2 or "alpha" not in t or "mid" in t:
        return module
    r = t["down"].shape[0]
    p = len(parts)
    if r % p:
        return module
    up = t["up"].reshape(t["up"].shape[0], -1)
    block = r // p
    start = module.target.rows[0] if module.target.rows else 0
    for i, part in enumerate(parts):
        lo, hi = (part.sized(config) if config is not None else part).rows
        rows = up[lo - start:hi - start]
        if rows[:, : i * block].any() or rows[:, (i + 1) * block:].any():
            return module  # not block-diagonal: an ordinary fused LoRA
    return replace(module, tensors={**t, "alpha": t["alpha"].double() * p})


def fused_parts(module: AdapterModule, config: ShapeConfig | None) -> list[AdapterModule]:
    """A module on a fused tensor (FLUX kohya ``img_attn.qkv``, ``linear1``) as one module per part of the
    diffusers layout (q, k, v, MLP), each changing the part's rows only, exactly; [] for any other module.

    LoRA: the down is shared and the up's rows are sliced (rank unchanged — the rank axis is never split);
    LoHa: both ``w*_a`` factors' rows are sliced; other families become the part's rows of their dense ΔW.
    """
    from ..arch import fused_parts as part_targets

    parts = part_targets(module.target)
    if not parts:
        return []
    if module.is_dora:
        raise MappingError(
            f"{module.target.name}: a DoRA module on a fused tensor cannot be split (its norm is over the whole tensor)",
            hint="merge it into the single-file (BFL) transformer instead",
        )
    start = module.target.rows[0] if module.target.rows else 0  # a module on some parts' rows only (XLabs qkv)
    out = []
    for part in parts:
        part = part.sized(config) if config is not None else part
        out.append(_rows_module(module, part.rows[0] - start, part.rows[1] - start, part))
    return out


def _rows_module(module: AdapterModule, lo: int, hi: int, target: ModuleTarget) -> AdapterModule:
    """The module whose ΔW is rows ``lo:hi`` of ``module``'s, on ``target``, exactly: LoRA slices the up's rows
    (the down and the rank stay), LoHa both ``w*_a`` factors' rows; other families take their dense ΔW rows."""
    from .math import delta

    t = module.tensors
    if module.family == "lora":
        rows = {"up": t["up"][lo:hi], **({"up_bias": t["up_bias"][lo:hi]} if "up_bias" in t else {})}
        return AdapterModule(target, "lora", {**t, **rows})
    if module.family == "loha" and "hada_t1" not in t:
        return AdapterModule(target, "loha", {**t, "hada_w1_a": t["hada_w1_a"][lo:hi], "hada_w2_a": t["hada_w2_a"][lo:hi]})
    return AdapterModule(target, "full", {"diff": delta(module)[lo:hi]})


# ----------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class NativeKeys:
    """A LoRA module's keys in one naming (``alpha``/``dora_scale`` None where the naming has none)."""

    down: str
    up: str
    alpha: str | None
    dora_scale: str | None
    up_bias: str | None = None


def native_keys(target: ModuleTarget, naming: Naming) -> NativeKeys:
    """The keys of a LoRA module on ``target`` in ``naming``, generated from the target's names.

    kohya: ``NAME.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` / ``.dora_scale``; comfyui (FLUX):
    ``diffusion_model.<BFL path>.lora_A.weight`` / ``.lora_B.weight`` / ``.alpha``; PEFT:
    ``module.lora_A.weight`` / ``.lora_B.weight`` (alpha folded, see :mod:`loratool.ops.convert`);
    diffusers: ``module.lora.down.weight`` (UNet) or ``module.lora_linear_layer.down.weight`` (text encoders).
    """
    if naming not in WRITABLE_NAMINGS:
        raise InternalError(f"no {naming} keys are written ({target.name})")
    if naming == "comfyui":  # FLUX: diffusion_model.<BFL path> for the transformer; text encoders keep kohya names
        if target.component != "transformer":
            return native_keys(target, "kohya")
        if target.rows is not None:
            raise InternalError(f"{target.name} covers rows of a BFL tensor; fuse it first (fuse_parts)")
        p = "diffusion_model." + target.address.removesuffix(".weight")
        return NativeKeys(f"{p}.lora_A.weight", f"{p}.lora_B.weight", f"{p}.alpha", f"{p}.dora_scale")
    if naming == "kohya":
        n = target.name
        if not n.startswith("lora_"):
            raise InternalError(f"{n} has no kohya name; widen it to its whole tensor first (fuse_parts)")
        return NativeKeys(f"{n}.lora_down.weight", f"{n}.lora_up.weight", f"{n}.alpha", f"{n}.dora_scale")
    m = target.peft_module
    if naming == "peft":
        return NativeKeys(f"{m}.lora_A.weight", f"{m}.lora_B.weight", None, None, f"{m}.lora_B.bias")
    mid = "lora" if target.component in DENOISERS else "lora_linear_layer"
    return NativeKeys(f"{m}.{mid}.down.weight", f"{m}.{mid}.up.weight", None, None)


def module_tensors(
    target: ModuleTarget,
    naming: Naming,
    down: torch.Tensor,
    up: torch.Tensor,
    alpha: torch.Tensor | None = None,
    dora_scale: torch.Tensor | None = None,
    up_bias: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """One LoRA module as ``{native key: tensor}`` (the only place adapter keys are put together).

    Raises:
        InternalError: an alpha, DoRA magnitude or LoRA bias for a naming that has no key for it.
    """
    keys = native_keys(target, naming)
    out = {keys.down: down, keys.up: up}
    for key, value, what in ((keys.alpha, alpha, "alpha"), (keys.dora_scale, dora_scale, "dora_scale"),
                             (keys.up_bias, up_bias, "up_bias")):
        if value is None:
            continue
        if key is None:
            raise InternalError(f"{naming} naming has no {what} key ({target.name})")
        out[key] = value
    return out


def replaced_key(arch: str, address: str, naming: Naming) -> str:
    """The key of a tensor an adapter gives in full (a control LoRA's norm scale) in ``naming``: the BFL key for
    kohya-style files, ``transformer.`` + the diffusers key for PEFT / diffusers names."""
    if naming == "kohya":
        return address
    from ..arch.sd_checkpoint import checkpoint_links

    whole = checkpoint_links(arch).diffusers_of(address)
    if whole is None:
        raise InternalError(f"{address} has no single diffusers counterpart")
    comp, key = whole.split("/", 1)
    return f"{comp}.{key}"


def is_alpha_key(key: str) -> bool:
    """Is ``key`` a module's alpha (in any naming)?"""
    parsed = split_key(key)
    return parsed is not None and parsed[1] == "alpha"


def save_adapter(
    out: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    inputs: Iterable[str | os.PathLike] = (),
    force: bool = False,
) -> Path:
    """Write an adapter file (container from ``out``'s suffix) with kohya's ``sshs_*`` hashes in its metadata."""
    from ..io.output import save_tensors
    from ..metadata import with_hashes

    return save_tensors(out, tensors, with_hashes(tensors, metadata), inputs=inputs, force=force)


def split_fused(adapter: LoadedAdapter) -> LoadedAdapter:
    """Replace, in place, every module of ``adapter`` on a fused single-file tensor by its exact per-part
    modules (:func:`fused_parts`), for a diffusers-layout base or output; returns ``adapter``."""
    for name in list(adapter.modules):
        parts = fused_parts(adapter.modules[name], adapter.config)
        if parts:
            del adapter.modules[name]
            for part in parts:
                adapter.modules[part.target.name] = part
    return adapter


def fuse_parts(adapter: LoadedAdapter) -> LoadedAdapter:
    """For kohya output: give every module on a whole BFL tensor its kohya name (``norm_out`` with its rows in
    BFL order, as ``lora_unet_final_layer_adaLN_modulation_1``: in memory for writing only), and replace, in place,
    the LoRA modules that each change some rows of one fused single-file tensor (PEFT/diffusers q, k, v and
    MLP-in parts; XLabs' single-block qkv) by one module on the whole tensor, its kohya module, exactly;
    returns ``adapter``.

    Parts that share one down and one scale (a fused LoRA split for PEFT) fuse back at their rank: the ups'
    rows are stacked, rows no part covers are zero, the alpha is kept. Otherwise the downs are stacked and the
    up is block-diagonal (rank Σ rᵢ); with one common scale s the alpha is s·Σ rᵢ and the factors are unchanged,
    else each part's scale is folded into its up block and alpha = Σ rᵢ. Such a file has no ``split_qkv`` in its
    metadata, so every loader (and loratool) applies ``alpha / rank``. DoRA, LoHa and LoKr parts, and parts whose
    tensor also has a whole-tensor module in the file, are left as they are (kohya-style names of the parts).
    """
    import torch

    from ..arch import kohya_modules
    from .families import scale_of

    if adapter.arch != "flux1":
        return adapter
    from ..arch import swapped_halves
    from ..arch.flux_naming import BFL_ORDER_KOHYA_NAME, extra_kohya_modules

    whole = {t.address: t for t in (*kohya_modules(adapter.arch).values(), *extra_kohya_modules().values())}
    for name, m in list(adapter.modules.items()):  # a diffusers Linear that is a whole BFL tensor: its kohya name
        t = m.target
        if swapped_halves(t) and BFL_ORDER_KOHYA_NAME not in adapter.modules and not m.is_dora:
            del adapter.modules[name]  # norm_out: kohya names it by the BFL tensor, rows in BFL order
            adapter.modules[BFL_ORDER_KOHYA_NAME] = swap_halves(m, replace(t, name=BFL_ORDER_KOHYA_NAME))
            continue
        if t.rows is None and t.address in whole and whole[t.address].name != name and not swapped_halves(t):
            target = whole[t.address].sized(adapter.config) if adapter.config is not None else whole[t.address]
            if target.name not in adapter.modules:
                del adapter.modules[name]
                adapter.modules[target.name] = replace(m, target=target)
    present = {m.target.address for m in adapter.modules.values() if m.target.rows is None}
    groups: dict[str, list[str]] = {}
    for name, m in adapter.modules.items():
        t = m.target
        if (t.rows is not None and t.address in whole and t.address not in present and m.family == "lora"
                and not m.is_dora and "mid" not in m.tensors and "up_bias" not in m.tensors):
            groups.setdefault(t.address, []).append(name)
    for address, names in groups.items():
        target = whole[address]
        if adapter.config is not None:
            target = target.sized(adapter.config)
        parts = sorted((adapter.modules[n] for n in names), key=lambda m: m.target.rows)
        first = parts[0].tensors
        out_rows = target.shape[0]
        dt = first["up"].dtype
        scales = [scale_of("lora", m.tensors) for m in parts]
        shared = all(torch.equal(m.tensors["down"], first["down"]) for m in parts) and len(set(scales)) == 1
        if shared:
            r = first["down"].shape[0]
            up = torch.zeros(out_rows, r, dtype=dt)
            for m in parts:
                up[slice(*m.target.rows)] = m.tensors["up"].reshape(-1, r)
            tensors = {"down": first["down"], "up": up}
            if "alpha" in first:
                tensors["alpha"] = first["alpha"]
        else:
            ranks = [m.tensors["down"].shape[0] for m in parts]
            total = sum(ranks)
            common = len(set(scales)) == 1
            up = torch.zeros(out_rows, total, dtype=dt)
            col = 0
            for m, r, s in zip(parts, ranks, scales):
                block = m.tensors["up"].reshape(-1, r)
                up[slice(*m.target.rows), col:col + r] = block if common else (block.double() * s).to(dt)
                col += r
            down = torch.cat([m.tensors["down"].reshape(r, -1) for m, r in zip(parts, ranks)])
            alpha = scales[0] * total if common else float(total)
            tensors = {"down": down.to(dt), "up": up, "alpha": torch.tensor(alpha, dtype=torch.float64)}
        for n in names:
            del adapter.modules[n]
        adapter.modules[target.name] = AdapterModule(target, "lora", tensors)
    return adapter


def split_swapped(adapter: LoadedAdapter) -> LoadedAdapter:
    """For a single-file base: replace, in place, every module on a target whose halves the single file
    stores swapped (FLUX ``norm_out.linear``) by two modules, each one half of the ΔW on the swapped rows
    (exact: LoRA up rows / LoHa ``w*_a`` rows are sliced, other families take their dense ΔW rows)."""
    from ..arch import swapped_halves

    for name in list(adapter.modules):
        module = adapter.modules[name]
        halves = swapped_halves(module.target)
        if not halves:
            continue
        if module.is_dora:
            raise MappingError(f"{name}: a DoRA module on norm_out cannot be merged into a BFL file",
                               hint="merge it into the diffusers transformer instead")
        del adapter.modules[name]
        for i, ((lo, hi), target) in enumerate(halves):
            adapter.modules[f"{name}/{'ab'[i]}"] = _rows_module(module, lo, hi, target)
    return adapter
