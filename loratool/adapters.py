"""Adapter families: which keys a module has, and the one formula for its ΔW.

Roles are the internal vocabulary for a module's tensors:

    lora   down (r,in[,kh,kw]), up (out,r[,1,1]), mid (r,r,kh,kw; LoCon Tucker), alpha, dora_scale
    loha   hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b, hada_t1, hada_t2, alpha, dora_scale
    lokr   lokr_w1 | lokr_w1_a+lokr_w1_b, lokr_w2 | lokr_w2_a+lokr_w2_b, lokr_t2, alpha, dora_scale
    full   diff (the whole ΔW), diff_b (bias ΔW)

:func:`delta` is the only place the scale convention ``alpha / rank`` is written.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from .arch import ARCHES, ModuleTarget, shape_rules
from .arch.dims import Solution
from .arch.sd_naming import module_index
from .errors import DetectionError, MappingError, listing

# Native key suffix → role, per naming. Longest suffix wins when several match.
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
SUFFIXES_BY_NAMING = {"kohya": KOHYA_SUFFIXES, "peft": PEFT_SUFFIXES, "diffusers": DIFFUSERS_SUFFIXES}


@dataclass(frozen=True)
class Family:
    """An adapter family: its display label and every role a module of it may hold."""

    name: str
    label: str
    roles: frozenset[str]


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("lora", "LoRA", frozenset({"down", "up", "mid", "alpha", "dora_scale"})),
        Family(
            "loha",
            "LoHa",
            frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha", "dora_scale"}),
        ),
        Family(
            "lokr",
            "LoKr",
            frozenset(
                {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha", "dora_scale"}
            ),
        ),
        Family("full", "full diff", frozenset({"diff", "diff_b"})),
    )
}


def family_of(roles: Iterable[str]) -> str:
    """Decide the family of one module from the roles present."""
    roles = set(roles)
    if roles & {"down", "up"}:
        return "lora"
    if any(r.startswith("hada_") for r in roles):
        return "loha"
    if any(r.startswith("lokr_") for r in roles):
        return "lokr"
    if roles & {"diff", "diff_b"}:
        return "full"
    raise DetectionError(f"cannot tell the adapter family from roles {sorted(roles)}")


@dataclass
class AdapterModule:
    """One adapter module: its target, family, tensors by role, and native keys by role."""

    target: ModuleTarget
    family: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)

    @property
    def alpha(self) -> float | None:
        a = self.tensors.get("alpha")
        return None if a is None else float(a.float().reshape(-1)[0])

    @property
    def is_dora(self) -> bool:
        return "dora_scale" in self.tensors


def split_key(key: str) -> tuple[str, str, str] | None:
    """``native key → (module name, role, naming)``, or None when no known suffix matches.

    kohya keys look like ``lora_unet_x.lora_down.weight``; PEFT ``unet.x.lora_A.weight``;
    diffusers ``unet.x.lora.down.weight``.
    """
    best: tuple[str, str, str] | None = None
    for naming, table in SUFFIXES_BY_NAMING.items():
        for suffix, role in table.items():
            if key.endswith("." + suffix):
                module = key[: -len(suffix) - 1]
                if best is None or len(suffix) > len(key) - len(best[0]) - 1:
                    best = (module, role, naming)
    return best


@dataclass
class AdapterIndex:
    """Where every key of an adapter file goes: per target module name, role → native key."""

    arch: str
    naming: str
    modules: dict[str, dict[str, str]]
    targets: dict[str, ModuleTarget]
    families: dict[str, str]
    unmapped: list[str]
    solution: Solution | None = None  # the shape config read off the factors (:func:`sized_index`); targets sized to it
    proportional: frozenset[str] = frozenset()  # modules whose sizes keep the standard proportions of that config

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
        names.append("unet." + module[len("base_model.model."):])
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
    for key in keys:
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
    return AdapterIndex(arch, naming, modules, targets, families, sorted(unmapped))


def _prod(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


_REQUIRED = {
    "lora": (("down", "up"),),
    "loha": (("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),),
    "lokr": (("lokr_w1", "lokr_w1_a"), ("lokr_w2", "lokr_w2_a")),
    "full": (("diff", "diff_b"),),
}


def factor_problem(family: str, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """What is wrong with a module's factors on their own (missing role, zero rank, ranks that disagree), or None."""
    for group in _REQUIRED.get(family, ()):
        if family in ("lora", "loha"):
            missing = [r for r in group if r not in shapes]
            if missing:
                return f"has no {', '.join(missing)}"
        elif not any(r in shapes for r in group):
            return f"has none of {' / '.join(group)}"
    pairs = {
        "lora": (("up", 1, "down", 0),),
        "loha": (("hada_w1_a", -1, "hada_w1_b", 0), ("hada_w2_a", -1, "hada_w2_b", 0)),
        "lokr": (("lokr_w1_a", 1, "lokr_w1_b", 0), ("lokr_w2_a", 1, "lokr_w2_b", 0)),
    }.get(family, ())
    if family == "loha" and "hada_t1" in shapes:
        pairs = ()  # Tucker LoHa stores both factors as (r, dim)
    if family == "lokr" and "lokr_t2" in shapes:
        pairs = pairs[:1]  # Tucker w2 factors are (r, b) and (r, d)
    for a, ai, b, bi in pairs:
        if a in shapes and b in shapes:
            ra, rb = shapes[a][ai] if shapes[a] else 0, shapes[b][bi] if shapes[b] else 0
            if ra != rb:
                return f"{a} has rank {ra} but {b} has rank {rb}"
            if ra == 0:
                return "has rank 0"
    return None


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
    """``(name, component, standard (out, in), actual (out, in))`` per module whose factors give both sizes."""
    for name, roles in index.modules.items():
        t = index.targets[name]
        ts = t.target_shape
        dims = _factor_dims(index.families[name], {r: tuple(specs[k].shape) for r, k in roles.items()}, ts)
        if dims is not None and len(ts) > 1:
            yield name, t.component, ts[:2], dims


def sized_index(index: AdapterIndex, specs: Mapping[str, object]) -> AdapterIndex:
    """Read the adapter's shape config off its factor shapes and size every target to it.

    A LoRA for the released model solves to the standard config; one for a smaller model of the same
    layout to that model's config. Idempotent: an index that is already sized is returned as it is.
    """
    if index.solution is not None:
        return index
    rules = shape_rules(index.arch)
    seen = list(_observations(index, specs))
    solution = rules.solve((comp, std, actual) for _, comp, std, actual in seen)
    kept = frozenset(name for name, comp, std, actual in seen if rules.in_proportion(solution, comp, std, actual))
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


def arch_from_metadata(metadata: Mapping[str, str]) -> str | None:
    """The base architecture a training tool recorded (kohya ``ss_base_model_version`` / ``ss_v2``, modelspec)."""
    version = (metadata.get("ss_base_model_version") or "").lower()
    arch_field = (metadata.get("modelspec.architecture") or "").lower()
    if version.startswith("sdxl") or arch_field.startswith("stable-diffusion-xl"):
        return "sdxl"
    if version.startswith("sd_v2") or arch_field.startswith("stable-diffusion-v2"):
        return "sd2"
    if version.startswith("sd_v1") or arch_field.startswith("stable-diffusion-v1"):
        return "sd1"
    v2 = (metadata.get("ss_v2") or "").lower()
    if v2 == "true":
        return "sd2"
    if v2 == "false" and metadata.get("ss_sd_model_name") is not None:
        return "sd1"
    return None


def best_arch(
    specs: Mapping[str, object], arches: Iterable[str] = ARCHES, metadata: Mapping[str, str] | None = None
) -> tuple[str, AdapterIndex, list[tuple[str, float]]]:
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
        mapped_keys = sum(len(r) for r in idx.modules.values())
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
    return scored[0][1], scored[0][2], [(a, round(sc, 4)) for sc, a, _ in scored]


# ----------------------------------------------------------------------------- math


def rank_of(family: str, t: Mapping[str, torch.Tensor]) -> int | None:
    """The rank that ``alpha`` is divided by; None when the module has no low-rank factor (scale 1)."""
    if family == "lora":
        return int(t["down"].shape[0])
    if family == "loha":
        return int(t["hada_w1_b"].shape[0])
    if family == "lokr":
        if "lokr_w2_b" in t:
            return int(t["lokr_w2_b"].shape[0])
        if "lokr_w1_b" in t:
            return int(t["lokr_w1_b"].shape[0])
        return None
    return None


def scale_of(family: str, t: Mapping[str, torch.Tensor]) -> float:
    """``alpha / rank``; alpha missing ⇒ alpha = rank (scale 1); no low-rank factor ⇒ 1."""
    rank = rank_of(family, t)
    if rank is None or "alpha" not in t:
        return 1.0
    return float(t["alpha"].float().reshape(-1)[0]) / rank


def _tucker(core: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Rebuild ``W[p, r, ...] = Σ_ij core[i, j, ...] · a[i, p] · b[j, r]`` (LyCORIS Tucker form)."""
    import torch
    return torch.einsum("ij...,ip,jr->pr...", core, a, b)


def lora_delta(down: torch.Tensor, up: torch.Tensor, mid: torch.Tensor | None = None) -> torch.Tensor:
    """Unscaled ΔW = up @ down for a LoRA / LoCon module.

    Linear: down (r,in), up (out,r) → (out,in). Conv: down (r,in,kh,kw), up (out,r,1,1) →
    ``ΔW[o,i,:,:] = Σ_r up[o,r]·down[r,i,:,:]``. Tucker (``mid`` (r,r,kh,kw), down (r,in,1,1),
    up (out,r,1,1)): ``ΔW[o,i,:,:] = Σ_ab up[o,a]·mid[a,b,:,:]·down[b,i]``.
    """
    import torch
    if mid is not None:
        u = up.reshape(up.shape[0], -1)
        d = down.reshape(down.shape[0], -1)
        return torch.einsum("ab...,oa,bi->oi...", mid, u, d)
    u = up.reshape(up.shape[0], -1)
    if down.dim() == 2:
        return u @ down
    return (u @ down.reshape(down.shape[0], -1)).reshape(u.shape[0], *down.shape[1:])


def loha_delta(t: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """Unscaled LoHa ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b), reshaped to the weight shape.

    With Tucker cores (hada_t1/hada_t2, r,r,kh,kw), each product is rebuilt as
    ``Σ_ij t[i,j,...]·a[i,out]·b[j,in]`` (a, b stored as r,out and r,in).
    """
    if "hada_t1" in t:
        w1 = _tucker(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"])
        w2 = _tucker(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])
        return (w1 * w2).reshape(shape)
    w1 = t["hada_w1_a"] @ t["hada_w1_b"]
    w2 = t["hada_w2_a"] @ t["hada_w2_b"]
    return (w1 * w2).reshape(shape)


def lokr_delta(t: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """Unscaled LoKr ΔW = kron(w1, w2), w1 (a,c), w2 (b,d[,kh,kw]); out = a·b, in = c·d.

    w1 = lokr_w1 or lokr_w1_a @ lokr_w1_b; w2 = lokr_w2, lokr_w2_a @ lokr_w2_b (reshaped to
    (b, d, kh, kw) for convs), or with ``lokr_t2`` the Tucker rebuild.
    """
    import torch
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    elif "lokr_t2" in t:
        w2 = _tucker(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
    else:
        w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
    a, c = w1.shape[0], w1.shape[1]
    b = shape[0] // a
    rest = shape[1:]
    d_total = 1
    for x in rest:
        d_total *= x
    w2 = w2.reshape(b, d_total // c)
    if len(shape) > 2:
        w2 = w2.reshape(b, shape[1] // c, *shape[2:])
        w1 = w1.reshape(a, c, *([1] * (len(shape) - 2)))
    return torch.kron(w1, w2).reshape(shape)


def delta(module: AdapterModule, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Scaled ΔW of one module in float32: ``(alpha / rank) · ΔW_family``, shaped like the target.

    DoRA modules (``dora_scale``) need the base weight: use :func:`apply_to_weight`.

    Args:
        module: the module's tensors by role.
        shape: the target weight's shape (defaults to the target's ``target_shape``).
    """
    t = {k: v.float() for k, v in module.tensors.items()}
    shape = tuple(shape or module.target.target_shape)
    scale = scale_of(module.family, t)
    if module.family == "lora":
        # the scale is folded into the small up factor instead of the large product
        d = lora_delta(t["down"], t["up"] * scale, t.get("mid"))
        scale = 1.0
    elif module.family == "loha":
        d = loha_delta(t, shape)
    elif module.family == "lokr":
        d = lokr_delta(t, shape)
    elif module.family == "full":
        d = t["diff"].clone()  # never hand out the module's own tensor
    else:
        raise DetectionError(f"{module.target.name}: unknown family {module.family}")
    if d.numel() != _numel(shape):
        raise MappingError(
            f"{module.target.name}: ΔW has shape {tuple(d.shape)}, target weight is {shape}",
            hint="the adapter was made for a different model",
        )
    d = d.reshape(shape)
    return d if scale == 1.0 else d * scale


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def apply_to_weight(
    weight: torch.Tensor,
    module: AdapterModule,
    ratio: float,
    delta_fn: Callable[[AdapterModule, tuple[int, ...]], torch.Tensor] = delta,
) -> torch.Tensor:
    """Return ``weight`` (float32, the module's target slice) with the module applied at ``ratio``.

    Plain families: ``W + ratio·(alpha/rank)·ΔW``.

    DoRA (``dora_scale`` m): ``W' = m · V / ‖V‖`` with ``V = W + (alpha/rank)·ΔW`` (the norm of the
    *merged* weight, as LyCORIS and PEFT compute it). The norm axis is read from m's shape:

    * (out, 1[, 1, 1]) or (out,): one norm per output row over every other axis — LyCORIS
      ``wd_on_out=True`` (its default since 2024) and PEFT's ``lora_magnitude_vector`` (out,);
    * (1, in[, 1, 1]): one norm per input channel over the output and kernel axes — older LyCORIS
      (``wd_on_out=False``).

    ``ratio`` blends the decomposed weight in: ``W + ratio·(W' − W)`` (ComfyUI's strength rule;
    ratio 1 gives W' exactly).
    """
    import torch
    w = weight.float()
    t = module.tensors
    if module.family == "lora" and "mid" not in t and not module.is_dora and delta_fn is delta:
        # same formula in one fused BLAS call, without a temporary ΔW: W + (ratio·scale·up) @ down
        up = t["up"].float().reshape(t["up"].shape[0], -1) * (ratio * scale_of("lora", t))
        down = t["down"].float().reshape(t["down"].shape[0], -1)
        if up.shape[0] * down.shape[1] == w.numel():
            return torch.addmm(w.reshape(up.shape[0], -1), up, down).reshape(w.shape)
    d = delta_fn(module, tuple(w.shape))
    if not module.is_dora:
        return torch.add(w, d, alpha=ratio)
    m = module.tensors["dora_scale"].float()
    merged = w + d
    if m.shape[0] == merged.shape[0] and (m.dim() < 2 or m.shape[1] == 1):
        norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(-1, *([1] * (merged.dim() - 1)))
    else:
        norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1)
        norm = norm.reshape(1, -1, *([1] * (merged.dim() - 2)))
    m = m.reshape(norm.shape)
    dora = merged * (m / (norm + torch.finfo(torch.float32).eps))
    return w + ratio * (dora - w)


@dataclass
class LoadedAdapter:
    """An adapter file resolved against one architecture: every module with its tensors."""

    arch: str
    naming: str
    modules: dict[str, AdapterModule]
    unmapped: list[str]
    scores: list[tuple[str, float]]
    metadata: dict[str, str]
    path: str = ""

    @property
    def families(self) -> set[str]:
        return {m.family for m in self.modules.values()}


def load_adapter(source, arch: str | None = None, allow_unmapped: bool = False) -> LoadedAdapter:
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
    for name, roles in index.modules.items():
        fam = index.families[name]
        shapes = {r: tuple(specs[k].shape) for r, k in roles.items()}
        if not shapes_fit(fam, shapes, index.targets[name]):
            misfit.append(f"{name} {shapes} vs {index.targets[name].target_shape}")
            continue
        modules[name] = AdapterModule(
            index.targets[name], fam, {r: source.get(k) for r, k in roles.items()}, dict(roles)
        )
    if misfit:
        raise MappingError(
            f"{source.path}: {len(misfit)} modules do not fit the {arch} weights: {listing(misfit, 3)}",
            hint="the adapter is for another architecture; check --arch",
        )
    return LoadedAdapter(arch, index.naming, modules, index.unmapped, scores, dict(source.metadata), str(source.path))
