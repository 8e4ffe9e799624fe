"""LoRA Block Weight (A1111 ``sd-webui-lora-block-weight``) slots and presets.

A slot names one block of the single-file UNet, or the text encoders:

    BASE    every text-encoder module (``te``, ``te1``, ``te2``)
    INnn    ``model.diffusion_model.input_blocks.nn``
    M00     ``model.diffusion_model.middle_block``
    OUTnn   ``model.diffusion_model.output_blocks.nn``

A weight list has one number per slot of one of the layouts below; SD1/SD2 take 17 or 26 numbers,
SDXL 12 or 20. As in the extension (its ``to26`` expansion), a block that the chosen layout does
not list gets weight 0: the short layouts only list the blocks that hold attention, so a LoCon's
resnet-only blocks (IN00, IN03, ... in the 17-slot layout) are switched off by them. UNet modules
outside every block (``time_embed``, ``out``; only LyCORIS' ``full`` preset targets them) keep
weight 1.

FLUX.1 takes the 61-slot layout of hako-mikan's block-weight tools for Flux (supermerger's ``BLOCKIDFLUX``):

    CLIP    CLIP-L modules (kohya ``lora_te1_``)
    T5      T5-XXL modules (``lora_te3_``, also ``lora_te2_``)
    IN      the input embedders: ``img_in``, ``txt_in``, ``time_in``, ``vector_in``, ``guidance_in``
    Dnn     ``double_blocks.nn`` (D00–D18)
    Snn     ``single_blocks.nn`` (S00–S37)
    OUT     ``final_layer`` (``norm_out`` and ``proj_out`` in diffusers names)

hako-mikan's table lists no ``guidance_in``; loratool counts it as IN (an input embedding, like ``time_in``).
Anything else (Chroma's ``distilled_guidance_layer``) keeps weight 1. The presets NONE, ALL and ALL0.5 apply.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .arch import ModuleTarget
from .errors import LoratoolError

SLOTS_26 = ("BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12)))
SLOTS_17 = (
    "BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00",
    "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11",
)  # fmt: skip
SLOTS_12 = ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05")
SLOTS_20 = ("BASE", *(f"IN{i:02d}" for i in range(9)), "M00", *(f"OUT{i:02d}" for i in range(9)))

SLOTS_FLUX = ("CLIP", "T5", "IN", *(f"D{i:02d}" for i in range(19)), *(f"S{i:02d}" for i in range(38)), "OUT")

LAYOUTS: dict[str, dict[int, tuple[str, ...]]] = {
    "sd1": {17: SLOTS_17, 26: SLOTS_26},
    "sd2": {17: SLOTS_17, 26: SLOTS_26},
    "sdxl": {12: SLOTS_12, 20: SLOTS_20},
    "flux1": {61: SLOTS_FLUX},
}
# FLUX.1: the BFL layers outside the numbered blocks, by slot
_FLUX_EDGES = {"img_in": "IN", "txt_in": "IN", "time_in": "IN", "vector_in": "IN", "guidance_in": "IN",
               "final_layer": "OUT"}
_FLUX_TEXT = {"text_encoder": "CLIP", "text_encoder_2": "T5"}

# The extension's built-in 17-slot presets (SD1/SD2).
PRESETS_17: dict[str, str] = {
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
    "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
    "ALL0.5": ",".join(["0.5"] * 17),
}
# Presets that mean the same for any layout (usable with SDXL's 12 / 20 slots).
UNIFORM_PRESETS = {"NONE": 0.0, "ALL": 1.0, "ALL0.5": 0.5}

_BLOCK_RE = re.compile(r"^model\.diffusion_model\.(input_blocks|middle_block|output_blocks)\.(\d+)?")


def block_of(target: ModuleTarget) -> str | None:
    """The slot of one module: ``BASE`` for text encoders, ``INnn`` / ``M00`` / ``OUTnn`` for UNet blocks,
    None for UNet modules outside the numbered blocks; for FLUX.1 (a ``transformer`` model) the slots above."""
    if target.component == "transformer" or target.diffusers_key.startswith("transformer/"):
        head, _, rest = target.address.partition(".")
        if head in ("double_blocks", "single_blocks"):
            return f"{head[0].upper()}{int(rest.split('.')[0]):02d}"
        return _FLUX_EDGES.get(head)
    if target.component != "unet":
        return "BASE"
    m = _BLOCK_RE.match(target.address)
    if not m:
        return None
    kind, num = m.group(1), m.group(2)
    if kind == "middle_block":
        return "M00"
    return f"{'IN' if kind == 'input_blocks' else 'OUT'}{int(num):02d}"


@dataclass(frozen=True)
class BlockWeights:
    """Weights per slot; :meth:`weight_for` gives a module's multiplier."""

    slots: tuple[str, ...]
    weights: tuple[float, ...]
    source: str

    def weight_for(self, target: ModuleTarget) -> float:
        block = block_of(target)
        if block == "BASE" and self.slots == SLOTS_FLUX:
            block = _FLUX_TEXT.get(target.component)
        if block is None:
            return 1.0
        table = dict(zip(self.slots, self.weights))
        return table.get(block, 0.0)

    def as_dict(self) -> dict[str, float]:
        return dict(zip(self.slots, self.weights))


def parse_block_weights(text: str, arch: str) -> BlockWeights:
    """A preset name (``OUTALL``) or a comma list of numbers (``1,0,0,...``) → :class:`BlockWeights` for ``arch``.

    Raises:
        LoratoolError: unknown preset, a value that is not a number, or a count the arch has no layout for.
    """
    if arch not in LAYOUTS:
        raise LoratoolError(f"--lbw block weights are not available for {arch} yet", hint="leave --lbw out")
    layouts = LAYOUTS[arch]
    counts = "/".join(str(n) for n in layouts)
    name = text.strip()
    if name.upper() in PRESETS_17:
        key = name.upper()
        if arch in ("sdxl", "flux1"):
            if key not in UNIFORM_PRESETS:
                raise LoratoolError(
                    f"--lbw preset {name!r} is a 17-slot SD1/SD2 preset",
                    hint=f"give {arch} {counts} numbers, comma-separated",
                )
            slots = min(layouts.items())[1]
            return BlockWeights(slots, (UNIFORM_PRESETS[key],) * len(slots), key)
        values = PRESETS_17[key]
    else:
        values = name
    try:
        weights = tuple(float(v) for v in values.split(","))
    except ValueError:
        raise LoratoolError(
            f"--lbw {text!r} is neither a preset nor a comma list of numbers",
            hint=f"presets: {', '.join(PRESETS_17)}; or {counts} numbers like 1,0,0.5,...",
        ) from None
    if len(weights) not in layouts:
        raise LoratoolError(
            f"--lbw has {len(weights)} numbers; {arch} block weights take {counts}",
            hint="slots are listed in docs/merge.md",
        )
    return BlockWeights(layouts[len(weights)], weights, name)
