"""Detection by score: which architecture and naming a checkpoint's keys match.

Scores are the share of a layout's keys present with the right shape (``coverage``) times the
share of the file's keys that the layout explains (``precision``). There is no default
architecture: a tie or a low score is an error that names ``--arch``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from .arch import ARCH_LABELS, ARCHES, Arch, CheckpointNaming, checkpoint_layout, component_labels, component_of, shape_rules
from .arch.sd import COMPONENT_LABELS, EMA_PREFIX
from .errors import DetectionError
from .io.source import TensorSpec

MIN_SCORE = 0.5


FileKind = Literal["checkpoint", "adapter", "other"]


@dataclass(frozen=True)
class CheckpointMatch:
    arch: Arch
    naming: CheckpointNaming
    score: float
    coverage: float
    precision: float
    prefix: str = ""  # the file's keys are the layout's under this prefix (ComfyUI's FLUX all-in-one files)


def without_ema(specs: Mapping[str, TensorSpec]) -> dict[str, TensorSpec]:
    """The EMA policy: a checkpoint's EMA shadow weights (``model_ema.*``) never count as evidence of what
    the file is. Every command passes them through unchanged; ``--prune`` and ``--to diffusers`` drop them
    (with that reason), and no command ever merges into them."""
    return {k: v for k, v in specs.items() if not k.startswith(EMA_PREFIX)}


def score_checkpoint(specs: Mapping[str, TensorSpec]) -> list[CheckpointMatch]:
    """Every (arch, naming) candidate scored against the file's keys, best first.

    Shapes are compared up to the shape config: a layout key counts when its rank (number of dims)
    matches, so models of any width score alike; the shape check that matters for
    merging is done against the concrete weights.
    """
    specs = without_ema(specs)
    keys = set(specs)
    out = []
    for arch in ARCHES:
        for naming in ("ldm", "diffusers"):
            for prefix in _PREFIXES.get((arch, naming), ("",)):
                out.append(_score(specs, keys, arch, naming, prefix))
    out.sort(key=lambda m: -m.score)
    return out


# ComfyUI saves FLUX.1 as one file: the BFL keys under model.diffusion_model., next to text_encoders.* and vae.*
_PREFIXES = {("flux1", "ldm"): ("", "model.diffusion_model.")}


def _score(specs: Mapping[str, TensorSpec], keys: set[str], arch: str, naming: str, prefix: str) -> CheckpointMatch:
    layout = checkpoint_layout(arch, naming)
    hit = [k for k in layout if prefix + k in keys and len(specs[prefix + k].shape) == len(layout[k].shape)]
    exact = sum(1 for k in hit if tuple(specs[prefix + k].shape) == layout[k].shape)
    coverage = len(hit) / len(layout)
    # an all-in-one file's text encoders and VAE are explained by their component prefixes
    explained = len(hit) + (sum(1 for k in keys if component_of(arch, k)[0] in _SIDE_COMPONENTS) if prefix else 0)
    if arch == "flux1" and naming == "ldm":
        from .arch.flux import is_scaled_fp8_key

        explained += sum(1 for k in keys if is_scaled_fp8_key(k))
    precision = explained / max(1, len(keys))
    # Among equally covering layouts (sd1 vs sd2 share UNet names), exact shapes break the tie.
    score = coverage * precision * (0.9 + 0.1 * exact / max(1, len(hit)))
    return CheckpointMatch(arch, naming, round(score, 4), round(coverage, 4), round(precision, 4), prefix)


_SIDE_COMPONENTS = ("text_encoder", "text_encoder_2", "vae")


def detect_checkpoint(specs: Mapping[str, TensorSpec], arch: str | None = None) -> CheckpointMatch:
    """The best (arch, naming) for a full checkpoint; raises when unsure.

    Raises:
        DetectionError: best score below 0.5, or a tie between architectures.
    """
    ranked = score_checkpoint(specs)
    if arch is not None:
        ranked = [m for m in ranked if m.arch == arch]
    best = ranked[0]
    if best.score < MIN_SCORE:
        raise DetectionError(
            f"keys match no known checkpoint layout (best: {best.arch}/{best.naming} "
            f"at {best.coverage:.0%} coverage)",
            hint="is this an SD1/SD2/SDXL checkpoint? pass --arch sd1|sd2|sdxl to force one",
        )
    if len(ranked) > 1 and ranked[1].score == best.score and ranked[1].arch != best.arch:
        raise DetectionError(
            f"keys fit {best.arch} and {ranked[1].arch} equally well", hint="pass --arch sd1|sd2|sdxl"
        )
    return best


# ----------------------------------------------------------------------------- whole-file detection


@dataclass(frozen=True)
class Candidate:
    """One scored hypothesis: architecture, naming (None for adapters scored per arch) and score."""

    arch: str
    naming: str | None
    score: float


@dataclass(frozen=True)
class FileDetection:
    """What a file is, with the evidence.

    Attributes:
        kind: ``checkpoint``, ``adapter`` or ``other`` (VAE-only, embedding, unknown tensors).
        arch: ``sd1`` | ``sd2`` | ``sdxl`` or None (``other``, or an adapter for another model family).
        naming: checkpoint ``ldm`` | ``diffusers``; adapter ``kohya`` | ``peft`` | ``diffusers``.
        confidence: the winner's score (checkpoints: coverage × precision in [0, 1]; adapters: the
            :func:`~loratool.adapters.best_arch` score, up to 1.1 with the metadata bonus).
        runner_up: the best candidate for another architecture, or None.
        forced: the architecture came from ``--arch``.
        description: one plain sentence (``SD1.x single-file (LDM) checkpoint``, ``VAE only`` ...).
        evidence: short lines saying why.
        other: what an ``other`` file is (``empty``, ``embedding``, ``vae``, ``unet``, ``text_encoder``,
            ``text_encoder_2``, ``unknown``); None for checkpoints and adapters.
    """

    kind: FileKind
    arch: Arch | None
    naming: str | None  # CheckpointNaming or adapter Naming
    confidence: float | None
    runner_up: Candidate | None
    candidates: tuple[Candidate, ...]
    forced: bool
    description: str
    evidence: tuple[str, ...]
    other: str | None = None  # for kind "other": empty | embedding | vae | unet | text_encoder | text_encoder_2 | unknown
    adapter_index: object = field(default=None, compare=False, repr=False)


_NAMING_LABEL = {"ldm": "single-file (LDM/SGM)", "diffusers": "diffusers-folder"}
_EMBEDDING_KEYS = ("emb_params", "clip_l", "clip_g", "string_to_param")
_VAE_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "first_stage_model.", "vae/")


ADAPTER_SHARE = 0.5  # a file is an adapter when at least this share of its keys carry an adapter suffix


def is_adapter(keys: Sequence[str]) -> bool:
    """The one rule every command uses: at least :data:`ADAPTER_SHARE` of the keys are adapter keys."""
    keys = list(keys)
    return bool(keys) and adapter_key_share(keys) >= ADAPTER_SHARE


def adapter_key_share(keys: Sequence[str]) -> float:
    """Share of keys that end in an adapter suffix (:func:`loratool.adapters.split_key` knows them all)."""
    from .adapters import split_key

    return sum(1 for k in keys if split_key(k) is not None) / max(1, len(keys))


@dataclass(frozen=True)
class ComponentMatch:
    """A file that holds one component of a checkpoint (a UNet-only or text-encoder-only file)."""

    arch: str
    naming: str
    component: str
    prefixed: bool  # keys carry the checkpoint's component prefix
    coverage: float
    precision: float
    exact: float


def match_component(specs: Mapping[str, TensorSpec]) -> list[ComponentMatch]:
    """Score every (arch, naming, component) against the file's keys, with and without the prefix; best first."""
    keys = set(specs)
    out = []
    for arch in ARCHES:
        for naming in ("ldm", "diffusers"):
            groups: dict[str, dict[str, tuple[str, TensorSpec]]] = {}
            for k, spec in checkpoint_layout(arch, naming).items():
                comp, rest = component_of(arch, k)
                if comp != "other":
                    groups.setdefault(comp, {})[k] = (rest, spec)
            for comp, group in groups.items():
                for prefixed in (True, False):
                    names = {(k if prefixed else rest): spec for k, (rest, spec) in group.items()}
                    hit = [k for k in names if k in keys and len(specs[k].shape) == len(names[k].shape)]
                    if not hit:
                        continue
                    # the file's shape config, read off its shapes; ``exact``: the share of tensors that fit it
                    # in the standard proportions (SD1 and SD2 share UNet names but not the context width)
                    rules = shape_rules(arch)
                    sol = rules.solve((comp, names[k].shape, specs[k].shape) for k in hit)
                    exact = sum(
                        1 for k in hit
                        if tuple(specs[k].shape) == rules.shape(comp, names[k].shape, sol.config)
                        and rules.in_proportion(sol, comp, names[k].shape, specs[k].shape)
                    ) / len(hit)
                    out.append(ComponentMatch(arch, naming, comp, prefixed, len(hit) / len(names), len(hit) / len(keys), exact))
    out.sort(key=lambda m: -(m.coverage * m.precision * (0.9 + 0.1 * m.exact)))
    return out


class OtherFile(NamedTuple):
    """What a file that is neither a checkpoint nor an adapter holds.

    ``what`` is ``empty``, ``embedding``, ``vae``, a component (``unet``, ``text_encoder``,
    ``text_encoder_2``) or ``unknown``; ``arch``/``naming`` are known for a component file only.
    """

    what: str
    description: str
    evidence: tuple[str, ...]
    arch: Arch | None
    naming: CheckpointNaming | None


def describe_other(specs: Mapping[str, TensorSpec]) -> OtherFile:
    """Name a file that is neither a checkpoint nor an adapter, plainly, from its key names."""
    keys = list(specs)
    if not keys:
        return OtherFile("empty", "empty: the file holds no tensors", ("0 tensors",), None, None)
    emb = [k for k in keys if k.split(".", 1)[0] in _EMBEDDING_KEYS]
    if emb and len(emb) >= len(keys) / 2:
        vectors = sum(specs[k].shape[0] for k in emb if len(specs[k].shape) == 2)
        return OtherFile(
            "embedding",
            f"textual-inversion embedding ({vectors} vectors), not a checkpoint or LoRA",
            (f"keys {', '.join(sorted({k.split('.', 1)[0] for k in emb}))}",),
            None,
            None,
        )
    vae = [k for k in keys if k.startswith(_VAE_PREFIXES)]
    if len(vae) == len(keys):
        evidence = (f"all {len(keys)} keys are VAE encoder/decoder keys",)
        return OtherFile("vae", "VAE only (autoencoder weights, no UNet or text encoder)", evidence, None, None)
    parts = match_component(specs)
    if parts and parts[0].coverage * parts[0].precision >= 0.8:
        best = parts[0]
        # SD1 and SD2 share the UNet key names; equal evidence leaves the architecture open.
        tie = [m for m in parts[1:] if (m.coverage, m.precision, m.exact) == (best.coverage, best.precision, best.exact)
               and m.arch != best.arch]
        arch = None if tie else best.arch
        label = ARCH_LABELS[arch] + " " if arch else ""
        form = "with" if best.prefixed else "without"
        evidence = (
            f"{best.coverage:.0%} of the {best.arch}/{best.naming} {best.component} keys present ({form} the component "
            f"prefix); {best.precision:.0%} of the file's keys explained",
        )
        if tie:
            evidence += (f"fits {', '.join(sorted({best.arch, *(m.arch for m in tie)}))} equally well",)
        description = f"{label}{component_labels(best.arch)[best.component]} only, not a full checkpoint"
        return OtherFile(best.component, description, evidence, arch, best.naming)
    ranked = score_checkpoint(specs)
    best = ranked[0]
    return OtherFile(
        "unknown",
        "unknown tensors: no checkpoint, adapter, VAE or embedding layout fits",
        (f"best checkpoint layout {best.arch}/{best.naming} covers {best.coverage:.0%} of its keys "
         f"and explains {best.precision:.0%} of the file's",),
        None,
        None,
    )


def detect_file(
    specs: Mapping[str, TensorSpec], metadata: Mapping[str, str] | None = None, arch: str | None = None
) -> FileDetection:
    """Decide kind, architecture and naming of a file from its header alone (no tensor data).

    Adapters (half the keys or more carry an adapter suffix) are scored with
    :func:`loratool.adapters.best_arch`; everything else with :func:`score_checkpoint`. A file
    that fits no checkpoint layout is ``other`` and described plainly instead of failing.

    Raises:
        DetectionError: two architectures fit equally well (the hint names ``--arch``), or a
            forced ``--arch`` does not fit a checkpoint.
    """
    metadata = metadata or {}
    keys = list(specs)
    if is_adapter(keys):
        return _detect_adapter(specs, metadata, arch)
    ranked = score_checkpoint(specs)
    if ranked[0].score < MIN_SCORE or ranked[0].coverage < 0.9:
        # A file holding one component (UNet only, text encoder only) is not a checkpoint, however well it scores.
        what, description, evidence, part_arch, part_naming = describe_other(specs)
        if ranked[0].score < MIN_SCORE or what in COMPONENT_LABELS or what == "transformer":
            return FileDetection(
                "other", part_arch, part_naming, None, None, _candidates(ranked), False, description, evidence, what
            )
    best = detect_checkpoint(specs, arch)
    runner = next((m for m in ranked if m.arch != best.arch), None)
    evidence = (
        f"{best.coverage:.1%} of the {best.arch}/{best.naming} layout's keys present; "
        f"{best.precision:.1%} of the file's keys explained",
    )
    missing = missing_components(specs, best.arch, best.naming)
    if missing:
        evidence += (f"no {', '.join(component_labels(best.arch)[c] for c in missing)} weights in the file",)
    return FileDetection(
        "checkpoint",
        best.arch,
        best.naming,
        best.score,
        Candidate(runner.arch, runner.naming, runner.score) if runner else None,
        _candidates(ranked),
        arch is not None,
        _checkpoint_description(best, specs),
        evidence,
    )


def _checkpoint_description(match: CheckpointMatch, specs: Mapping[str, TensorSpec]) -> str:
    if match.arch == "flux1":
        from .arch.flux import variant

        img_in = specs.get(match.prefix + "img_in.weight") or specs.get("transformer/x_embedder.weight")
        kind = variant(specs, img_in.shape[1] if img_in is not None and len(img_in.shape) == 2 else None)
        if match.prefix:
            parts = sorted({component_of("flux1", k)[0] for k in specs} & set(_SIDE_COMPONENTS))
            extra = " + ".join(component_labels("flux1")[c] for c in parts)
            return f"FLUX.1-{kind} ComfyUI single file (transformer{' + ' + extra if extra else ''})"
        layout = "BFL single-file" if match.naming == "ldm" else "diffusers"
        scaled = " (ComfyUI scaled fp8)" if match.prefix + "scaled_fp8" in specs else ""
        return f"FLUX.1-{kind} {layout} transformer{scaled}"
    return f"{ARCH_LABELS[match.arch]} {_NAMING_LABEL[match.naming]} checkpoint"


def missing_components(specs: Mapping[str, TensorSpec], arch: str, naming: str) -> list[str]:
    """Components of the ``arch``/``naming`` layout of which the file holds less than half the keys."""
    total: dict[str, int] = {}
    present: dict[str, int] = {}
    for k in checkpoint_layout(arch, naming):
        comp = component_of(arch, k)[0]
        if comp == "other":
            continue
        total[comp] = total.get(comp, 0) + 1
        present[comp] = present.get(comp, 0) + (k in specs)
    return [c for c in component_labels(arch) if c in total and present[c] < total[c] / 2]


def _candidates(ranked: list[CheckpointMatch]) -> tuple[Candidate, ...]:
    return tuple(Candidate(m.arch, m.naming, m.score) for m in ranked)


def _detect_adapter(specs: Mapping[str, TensorSpec], metadata: Mapping[str, str], arch: str | None) -> FileDetection:
    from .adapters import best_arch, index_adapter

    keys = list(specs)
    try:
        chosen, index, scores = best_arch(specs, arches=(arch,) if arch else ARCHES, metadata=metadata)
    except DetectionError:
        if arch is None and any(index_adapter(keys, a).modules for a in ARCHES):
            raise  # a tie: the hint names --arch
        # No SD module name at all: an adapter for another model family. Shown, not fatal.
        index = index_adapter(keys, arch or ARCHES[0])
        return FileDetection(
            "adapter", None, None, 0.0, None, (), arch is not None,
            "adapter for an unknown model (no SD1/SD2/SDXL module names)",
            (f"{len(keys)} adapter keys, none maps to an SD1/SD2/SDXL module",),
            adapter_index=index,
        )
    mapped = sum(len(r) for r in index.modules.values())
    runner = next(((a, s) for a, s in scores if a != chosen), None)
    evidence = [f"{mapped} of {len(keys)} keys map to {len(index.modules)} {chosen} modules"]
    if index.replaced:
        evidence.append(f"{len(index.replaced)} keys are {chosen} tensors given in full (a control LoRA's norm scales)")
    if index.unmapped:
        evidence.append(f"{len(index.unmapped)} keys map to no {chosen} module")
    if index.modules:
        from .adapters import fit_count

        fitting = fit_count(index, specs)
        if fitting < len(index.modules):
            evidence.append(f"only {fitting} of {len(index.modules)} modules have factor shapes that fit the {chosen} weights")
    if metadata and (recorded := _recorded_arch(metadata)):
        evidence.append(f"metadata names base model {recorded}")
    return FileDetection(
        "adapter",
        chosen,
        index.naming,
        scores[0][1],
        Candidate(runner[0], None, runner[1]) if runner else None,
        tuple(Candidate(a, None, s) for a, s in scores),
        arch is not None,
        f"{ARCH_LABELS[chosen]} adapter ({index.naming} naming)",
        tuple(evidence),
        adapter_index=index,
    )


def _recorded_arch(metadata: Mapping[str, str]) -> str | None:
    from .metadata.kohya import arch_from_metadata

    return arch_from_metadata(metadata)
