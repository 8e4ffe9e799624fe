"""Detection by score: which architecture and naming a checkpoint's keys match.

Scores are the share of a layout's keys present with the right shape (``coverage``) times the
share of the file's keys that the layout explains (``precision``). There is no default
architecture: a tie or a low score is an error that names ``--arch``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .errors import DetectionError
from .layouts import ARCHES, checkpoint_layout
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
