"""Adapter families: the roles a module of each family holds, which are required, and its rank/scale.

Roles are the internal vocabulary for a module's tensors (native key names live in :mod:`.io`):

    lora   down (r,in[,kh,kw]), up (out,r[,1,1]), mid (r,r,kh,kw; LoCon Tucker), alpha, dora_scale,
           up_bias (out,; PEFT ``lora_B.bias``, BFL control LoRAs: the bias ΔW is scale·up_bias)
    loha   hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b, hada_t1, hada_t2, alpha, dora_scale
    lokr   lokr_w1 | lokr_w1_a+lokr_w1_b, lokr_w2 | lokr_w2_a+lokr_w2_b, lokr_t2, alpha, dora_scale
    full   diff (the whole ΔW), diff_b (bias ΔW)

:func:`scale_of` is the only place the scale convention ``alpha / rank`` is written.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

from ..arch import ModuleTarget
from ..errors import DetectionError

FamilyName = Literal["lora", "loha", "lokr", "full"]


@dataclass(frozen=True)
class Family:
    """An adapter family.

    Attributes:
        name: ``lora`` | ``loha`` | ``lokr`` | ``full``.
        label: display name.
        roles: every role a module of it may hold.
        required: groups of alternatives: a complete module holds, for every group, all roles of
            one alternative (LoKr: ``lokr_w1`` or ``lokr_w1_a``+``lokr_w1_b``, and the same for w2).
    """

    name: FamilyName
    label: str
    roles: frozenset[str]
    required: tuple[tuple[frozenset[str], ...], ...]


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("lora", "LoRA", frozenset({"down", "up", "mid", "alpha", "dora_scale", "up_bias", "down_bias"}),
               ((frozenset({"down", "up"}),),)),
        Family(
            "loha",
            "LoHa",
            frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha", "dora_scale"}),
            ((frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}),),),
        ),
        Family(
            "lokr",
            "LoKr",
            frozenset(
                {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha", "dora_scale"}
            ),
            (
                (frozenset({"lokr_w1"}), frozenset({"lokr_w1_a", "lokr_w1_b"})),
                (frozenset({"lokr_w2"}), frozenset({"lokr_w2_a", "lokr_w2_b"})),
            ),
        ),
        Family("full", "full diff", frozenset({"diff", "diff_b"}), ((frozenset({"diff"}), frozenset({"diff_b"})),)),
    )
}


def family_of(roles: Iterable[str]) -> FamilyName:
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
    family: FamilyName
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)

    @property
    def alpha(self) -> float | None:
        a = self.tensors.get("alpha")
        return None if a is None else float(a.float().reshape(-1)[0])

    @property
    def is_dora(self) -> bool:
        return is_dora(self.tensors)

    @property
    def dora_scale(self) -> torch.Tensor | None:
        """The DoRA magnitude, or None."""
        return self.tensors.get("dora_scale")


def is_dora(roles: Iterable[str]) -> bool:
    """Does a module with these roles carry a DoRA magnitude?"""
    return "dora_scale" in set(roles)


def is_tucker(roles: Iterable[str]) -> bool:
    """Does a module with these roles store a Tucker core (LoCon ``mid``, LoHa ``hada_t1``, LoKr ``lokr_t2``)?"""
    return bool({"mid", "hada_t1", "lokr_t2"} & set(roles))


def _prod(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def missing_roles(family: str, roles: Iterable[str]) -> str | None:
    """What a module of ``family`` lacks to be complete (from :attr:`Family.required`), or None."""
    roles = set(roles)
    for group in FAMILIES[family].required if family in FAMILIES else ():
        if any(alt <= roles for alt in group):
            continue
        if len(group) == 1:
            return f"has no {', '.join(sorted(group[0] - roles))}"
        return "has none of " + " / ".join("+".join(sorted(alt)) for alt in group)
    return None


def factor_problem(family: str, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """What is wrong with a module's factors on their own (missing role, zero rank, ranks that disagree), or None."""
    missing = missing_roles(family, shapes)
    if missing:
        return missing
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
