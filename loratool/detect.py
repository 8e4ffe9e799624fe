"""Detection by score: which architecture and naming a checkpoint's keys match.

Scores are the share of a layout's keys present with the right shape (``coverage``) times the
share of the file's keys that the layout explains (``precision``). There is no default
architecture: a tie or a low score is an error that names ``--arch``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .errors import DetectionError
from .layouts import ARCH_LABELS, ARCHES, checkpoint_layout
from .source import TensorSpec

MIN_SCORE = 0.5


@dataclass(frozen=True)
class CheckpointMatch:
    arch: str
    naming: str  # "ldm" (single file, LDM/SGM keys) or "diffusers" (component/key)
    score: float
    coverage: float
    precision: float


def score_checkpoint(specs: Mapping[str, TensorSpec]) -> list[CheckpointMatch]:
    """Every (arch, naming) candidate scored against the file's keys, best first.

    Shapes are compared up to scale: a layout key counts when its rank (number of dims) matches,
    so shrunken test files and full-size files score alike; the shape check that matters for
    merging is done against the concrete weights.
    """
    keys = set(specs)
    out = []
    for arch in ARCHES:
        for naming in ("ldm", "diffusers"):
            layout = checkpoint_layout(arch, naming)
            hit = [k for k in layout if k in keys and len(specs[k].shape) == len(layout[k].shape)]
            exact = sum(1 for k in hit if tuple(specs[k].shape) == layout[k].shape)
            coverage = len(hit) / len(layout)
            precision = len(hit) / max(1, len(keys))
            # Among equally covering layouts (sd1 vs sd2 share UNet names), exact shapes break the tie.
            score = coverage * precision * (0.9 + 0.1 * exact / max(1, len(hit)))
            out.append(CheckpointMatch(arch, naming, round(score, 4), round(coverage, 4), round(precision, 4)))
    out.sort(key=lambda m: -m.score)
    return out


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
    """

    kind: str
    arch: str | None
    naming: str | None
    confidence: float | None
    runner_up: Candidate | None
    candidates: tuple[Candidate, ...]
    forced: bool
    description: str
    evidence: tuple[str, ...]
    adapter_index: object = field(default=None, compare=False, repr=False)


_NAMING_LABEL = {"ldm": "single-file (LDM/SGM)", "diffusers": "diffusers-folder"}
_EMBEDDING_KEYS = ("emb_params", "clip_l", "clip_g", "string_to_param")
_VAE_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "first_stage_model.", "vae/")


def adapter_key_share(keys: Sequence[str]) -> float:
    """Share of keys that end in an adapter suffix (``.lora_down.weight``, ``.hada_w1_a``, ``.lora_A.weight``...)."""
    from .adapters import split_key

    return sum(1 for k in keys if split_key(k) is not None) / max(1, len(keys))


def describe_other(specs: Mapping[str, TensorSpec]) -> tuple[str, tuple[str, ...]]:
    """Name a file that is neither a checkpoint nor an adapter, plainly, from its key names."""
    keys = list(specs)
    if not keys:
        return "empty: the file holds no tensors", ("0 tensors",)
    emb = [k for k in keys if k.split(".", 1)[0] in _EMBEDDING_KEYS]
    if emb and len(emb) >= len(keys) / 2:
        vectors = sum(specs[k].shape[0] for k in emb if len(specs[k].shape) == 2)
        return (
            f"textual-inversion embedding ({vectors} vectors), not a checkpoint or LoRA",
            (f"keys {', '.join(sorted({k.split('.', 1)[0] for k in emb}))}",),
        )
    vae = [k for k in keys if k.startswith(_VAE_PREFIXES)]
    if len(vae) == len(keys):
        return "VAE only (autoencoder weights, no UNet or text encoder)", (f"all {len(keys)} keys are VAE encoder/decoder keys",)
    ranked = score_checkpoint(specs)
    best = ranked[0]
    return (
        "unknown tensors: no checkpoint, adapter, VAE or embedding layout fits",
        (f"best checkpoint layout {best.arch}/{best.naming} covers {best.coverage:.0%} of its keys "
         f"and explains {best.precision:.0%} of the file's",),
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
    if keys and adapter_key_share(keys) >= 0.5:
        return _detect_adapter(specs, metadata, arch)
    ranked = score_checkpoint(specs)
    if ranked[0].score < MIN_SCORE and arch is None:
        description, evidence = describe_other(specs)
        return FileDetection("other", None, None, None, None, _candidates(ranked), False, description, evidence)
    best = detect_checkpoint(specs, arch)
    runner = next((m for m in ranked if m.arch != best.arch), None)
    evidence = (
        f"{best.coverage:.1%} of the {best.arch}/{best.naming} layout's keys present; "
        f"{best.precision:.1%} of the file's keys explained",
    )
    return FileDetection(
        "checkpoint",
        best.arch,
        best.naming,
        best.score,
        Candidate(runner.arch, runner.naming, runner.score) if runner else None,
        _candidates(ranked),
        arch is not None,
        f"{ARCH_LABELS[best.arch]} {_NAMING_LABEL[best.naming]} checkpoint",
        evidence,
    )


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
    if index.unmapped:
        evidence.append(f"{len(index.unmapped)} keys map to no {chosen} module")
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
    from .adapters import arch_from_metadata

    return arch_from_metadata(metadata)
