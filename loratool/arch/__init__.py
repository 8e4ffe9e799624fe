"""Architecture layouts as data: checkpoint key tables and LoRA module → target maps.

The tables in ``data/`` were produced by the reference tools themselves (see
``data/SOURCE.md``). This module only reads them; it never sees tensor values.

Vocabulary:
    arch      ``sd1`` | ``sd2`` | ``sdxl``
    address   the key of a target weight in the architecture's single-file (LDM/SGM)
              checkpoint, e.g. ``model.diffusion_model.input_blocks.1.1.proj_in.weight``;
              the one name that crosses module boundaries.
    target    an address plus an optional row slice (fused q/k/v in OpenCLIP ``in_proj_weight``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cache
from importlib import resources
from typing import Literal

from ..io.source import TensorSpec
from .dims import ShapeConfig, ShapeRules

Arch = Literal["sd1", "sd2", "sdxl", "flux1"]
CheckpointNaming = Literal["ldm", "diffusers"]  # single file (LDM/SGM keys) or diffusers folder (component/key)
LayerKind = Literal["linear", "conv1x1", "conv3x3"]

ARCHES: tuple[Arch, ...] = ("sd1", "sd2", "sdxl", "flux1")
SD_ARCHES: tuple[Arch, ...] = ("sd1", "sd2", "sdxl")
DENOISERS = ("unet", "transformer")  # the component an image model's denoiser is called (the rest: text encoders, VAE)
ARCH_LABELS = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL", "flux1": "FLUX.1"}
_FILE_PREFIX = {"sd1": "sd15", "sd2": "sd21", "sdxl": "sdxl", "flux1": "flux1"}
# tables whose names do not follow ``{prefix}-{naming}.tsv``
_TABLE_NAMES = {
    ("flux1", "ldm"): "flux1-dev-bfl.tsv",
    ("flux1", "diffusers"): "flux1-dev-diffusers.tsv",
    ("flux1", "lora-kohya-to-ldm"): "flux1-lora-kohya-to-bfl.tsv",
}


def _table(arch: str, naming: str) -> str:
    return _TABLE_NAMES.get((arch, naming), f"{_FILE_PREFIX[arch]}-{naming}.tsv")


@dataclass(frozen=True)
class ModuleTarget:
    """One adaptable module and the checkpoint weight it changes.

    Attributes:
        name: kohya module name (``lora_unet_..._to_q``), the prefix of its LoRA keys.
        kind: layer kind in the network kohya trains: ``linear``, ``conv1x1`` or ``conv3x3``.
        address: single-file checkpoint key of the changed weight.
        rows: ``(start, stop)`` along dim 0 when only a slice of a fused weight changes.
        shape: shape of ``address`` in the checkpoint (the whole fused tensor when ``rows``).

    The tables give ``rows`` and ``shape`` for the released model; :meth:`sized` moves them to
    another shape config.
        diffusers_key: ``component/key`` of the same parameter in a diffusers folder.
    """

    name: str
    kind: LayerKind
    address: str
    rows: tuple[int, int] | None
    shape: tuple[int, ...]
    diffusers_key: str

    @property
    def component(self) -> str:
        """``unet``, ``text_encoder`` or ``text_encoder_2``."""
        return self.diffusers_key.split("/", 1)[0]

    @property
    def target_shape(self) -> tuple[int, ...]:
        """Shape of the part of ``address`` that the module's ΔW covers."""
        if self.rows is None:
            return self.shape
        return (self.rows[1] - self.rows[0], *self.shape[1:])

    def sized(self, config: ShapeConfig) -> ModuleTarget:
        """This target in a model of shape config ``config`` (shape and row slice moved there)."""
        rules = shape_rules(config.arch)
        rows = None if self.rows is None else rules.rows(self.component, self.rows, config)
        return replace(self, rows=rows, shape=rules.shape(self.component, self.shape, config, self.address))

    @property
    def peft_module(self) -> str:
        """PEFT / diffusers module path: ``unet.down_blocks.0...to_q`` (component-prefixed, no ``.weight``)."""
        comp, key = self.diffusers_key.split("/", 1)
        return f"{comp}.{key.removesuffix('.weight')}"


def shape_rules(arch: str) -> ShapeRules:
    """How every tensor size of ``arch`` follows from its shape config (:mod:`.dims`)."""
    if arch == "flux1":
        from . import flux

        return flux.shape_rules()
    from .sd import shape_rules as sd_rules

    return sd_rules(arch)


def component_of(arch: str, key: str) -> tuple[str, str]:
    """``(component, key without its component prefix)`` of a checkpoint key of ``arch``."""
    if arch == "flux1":
        from .flux import component_of_key
    else:
        from .sd import component_of_key
    return component_of_key(key)


def component_labels(arch: str) -> dict[str, str]:
    """Component → display name (``unet`` → ``UNet``, ``transformer`` → ``transformer``...)."""
    if arch == "flux1":
        from .flux import COMPONENT_LABELS
    else:
        from .sd import COMPONENT_LABELS
    return COMPONENT_LABELS


def fused_parts(target: ModuleTarget) -> list[ModuleTarget]:
    """The diffusers-layout targets a module on a fused single-file tensor splits into (FLUX.1's q/k/v and
    MLP-in rows), in row order; [] when ``target`` covers one diffusers tensor."""
    if "+" not in target.diffusers_key:
        return []
    from .flux_naming import split_modules

    keys = set(target.diffusers_key.split("+"))
    parts = [t for t in split_modules().values() if t.address == target.address and t.diffusers_key in keys]
    return sorted(parts, key=lambda t: t.rows or (0, 0))


def swapped_halves(target: ModuleTarget) -> list[tuple[tuple[int, int], ModuleTarget]]:
    """A target whose single-file tensor holds its two halves the other way round (FLUX ``norm_out`` ↔
    ``final_layer.adaLN_modulation.1``): ``[(rows of ΔW, target with the single-file rows they go to)]``,
    in the target's own config; [] for any other target."""
    if "/" not in target.diffusers_key or not target.diffusers_key.startswith("transformer/"):
        return []
    from .flux_naming import SWAPPED_HALVES

    if target.diffusers_key not in SWAPPED_HALVES:
        return []
    half = target.shape[0] // 2
    return [((0, half), replace(target, rows=(half, 2 * half))), ((half, 2 * half), replace(target, rows=(0, half)))]


def module_index(arch: str) -> dict[str, tuple[str, ModuleTarget]]:
    """Every native adapter module name of ``arch`` → (naming, target)."""
    if arch == "flux1":
        from .flux_naming import module_index as index
    else:
        from .sd_naming import module_index as index
    return index(arch)


def standard_config(arch: str) -> ShapeConfig:
    """The shape config of ``arch``'s released model (the key tables' shapes)."""
    return shape_rules(arch).standard_config


def layout_in(arch: str, naming: str, config: ShapeConfig) -> dict[str, TensorSpec]:
    """:func:`checkpoint_layout` with every shape moved to ``config``."""
    rules = shape_rules(arch)
    return {
        k: TensorSpec(rules.shape(component_of(arch, k)[0], s.shape, config, k), s.dtype)
        for k, s in checkpoint_layout(arch, naming).items()
    }


def _read(name: str) -> str:
    return resources.files(__package__).joinpath("data", name).read_text()


def _parse_shape(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",")) if text else ()


def read_table(name: str) -> dict[str, TensorSpec]:
    """A ``key<TAB>shape<TAB>dtype`` table from ``data/`` as ``{key: TensorSpec}``.

    Keys with the same shape and dtype share one (immutable) spec: a table has a few hundred distinct
    specs for thousands of keys, and building each once keeps the first command's start-up short.
    """
    out: dict[str, TensorSpec] = {}
    specs: dict[tuple[str, str], TensorSpec] = {}
    for line in _read(name).splitlines():
        if not line:
            continue
        key, shape, dtype = line.split("\t")
        spec = specs.get((shape, dtype))
        if spec is None:
            spec = specs[(shape, dtype)] = TensorSpec(_parse_shape(shape), dtype)
        out[key] = spec
    return out


@cache
def checkpoint_layout(arch: str, naming: str = "ldm") -> dict[str, TensorSpec]:
    """Every key of a full checkpoint of ``arch`` in ``ldm`` (single file) or ``diffusers`` naming.

    Diffusers keys are ``component/key``. Float dtypes are listed as F16 (an fp16 release).
    """
    return read_table(_table(arch, naming))


@cache
def kohya_modules(arch: str) -> dict[str, ModuleTarget]:
    """kohya module name → :class:`ModuleTarget` for the kohya default + ``conv_dim`` network."""
    out: dict[str, ModuleTarget] = {}
    for line in _read(_table(arch, "lora-kohya-to-ldm")).splitlines():
        if not line:
            continue
        name, kind, address, rows, shape, dkey = line.split("\t")
        r = tuple(int(x) for x in rows.split(":")) if rows else None
        out[name] = ModuleTarget(name, kind, address, r, _parse_shape(shape), dkey)  # type: ignore[arg-type]
    return out


@cache
def adapter_layout(arch: str, naming: str) -> dict[str, TensorSpec]:
    """Key table of a reference adapter file: naming is ``lora-kohya``, ``lora-peft``, ``lora-diffusers``,
    ``lycoris-loha`` or ``lycoris-lokr`` (not every naming exists for every arch)."""
    return read_table(f"{_FILE_PREFIX[arch]}-{naming}.tsv")


def adapter_layout_names(arch: str) -> list[str]:
    prefix = _FILE_PREFIX[arch] + "-"
    names = []
    for entry in resources.files(__package__).joinpath("data").iterdir():
        n = entry.name
        if n.startswith(prefix) and n.endswith(".tsv") and ("-lora-" in n or "-lycoris-" in n) and "-to-" not in n:
            names.append(n[len(prefix): -4])
    return sorted(names)
