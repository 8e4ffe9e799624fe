"""Shape configs: the few numbers (widths, vocabulary, latent channels...) that size every tensor.

An architecture's key tables (``data/*.tsv``) list the shapes of its standard release. Its
:class:`ShapeRules` say which config dimension each tensor dimension is made of: per component,
the dimensions used and the multiples of them that appear (a UNet's widths are 1, 2, 4 × its base
channels; a text encoder's MLP is 4 × its width). From the standard values the rules build, per
component, the map ``standard size → (dimension, multiple)``; a size that no dimension explains
(a kernel size, RGB's 3, a noise schedule's 1000 steps) is a constant of the architecture.

With that map every shape and every fused-row slice of any config follows from the table, and a
file's config is read off its shapes (:meth:`ShapeRules.solve`): each tensor votes for the
dimensions its sizes are made of, the majority wins, and every tensor is then checked against the
result. A real file solves to the standard config; any other genuine config (a small model with
the same layout) solves to itself.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cached_property

from ..errors import InternalError


@dataclass(frozen=True)
class Dim:
    """One config dimension.

    Attributes:
        name: config field (``unet_channels``).
        doc: what it is, in the reference tools' words.
        multiples: component → the multiples of it that appear as tensor sizes there.
    """

    name: str
    doc: str
    multiples: Mapping[str, tuple[int, ...]]


@dataclass(frozen=True)
class ShapeConfig:
    """Values of an architecture's config dimensions (a frozen, ordered mapping)."""

    arch: str
    values: tuple[tuple[str, int], ...]

    def __getitem__(self, name: str) -> int:
        for k, v in self.values:
            if k == name:
                return v
        raise KeyError(name)

    def as_dict(self) -> dict[str, int]:
        return dict(self.values)

    def replace(self, **changes: int) -> ShapeConfig:
        unknown = set(changes) - {k for k, _ in self.values}
        if unknown:
            raise KeyError(f"{self.arch} has no config dimension {sorted(unknown)}")
        return ShapeConfig(self.arch, tuple((k, changes.get(k, v)) for k, v in self.values))


@dataclass(frozen=True)
class Solution:
    """A config read off a file's shapes.

    Attributes:
        config: every dimension (observed ones by majority vote, the others at their standard value).
        observed: the dimensions some tensor of the file voted for.
        ratio: the most common ``standard / observed`` ratio of the observed dimensions (1 for a real
            file). A tensor whose sizes all keep that ratio keeps the standard proportions; the share
            of such tensors ranks architectures whose key names fit equally well.
    """

    config: ShapeConfig
    observed: frozenset[str]
    ratio: Fraction


@dataclass(frozen=True)
class ShapeRules:
    """How an architecture's tensor sizes follow from its config.

    Attributes:
        arch: architecture name.
        dims: every config dimension.
        standard: the standard release's values (the key tables' shapes).
    """

    arch: str
    dims: tuple[Dim, ...]
    standard: Mapping[str, int]
    by_key: Mapping[str, Mapping[int, tuple[str, int]]] = field(default_factory=dict)
    """Exceptions to the size map for single tensors: key → dim index → (dimension, multiple). FLUX's
    ``img_in`` input width is its own dimension (Fill and Depth widen it) although it equals the output
    width in the released model."""

    @cached_property
    def standard_config(self) -> ShapeConfig:
        return ShapeConfig(self.arch, tuple((d.name, self.standard[d.name]) for d in self.dims))

    @cached_property
    def _size_map(self) -> dict[str, dict[int, tuple[str, int]]]:
        """component → standard size → (dimension, multiple). Two dimensions explaining one size is a table bug."""
        out: dict[str, dict[int, tuple[str, int]]] = {}
        for d in self.dims:
            for comp, mults in d.multiples.items():
                sizes = out.setdefault(comp, {})
                for m in mults:
                    size = self.standard[d.name] * m
                    if size in sizes and sizes[size] != (d.name, m):
                        raise InternalError(
                            f"{self.arch}/{comp}: size {size} is both {sizes[size]} and {(d.name, m)}"
                        )
                    sizes[size] = (d.name, m)
        return out

    def term(self, component: str, size: int, key: str | None = None, dim: int | None = None) -> tuple[str, int] | None:
        """``(dimension, multiple)`` a standard size of ``component`` is made of, or None for a constant."""
        if key is not None and dim is not None and key in self.by_key and dim in self.by_key[key]:
            return self.by_key[key][dim]
        return self._size_map.get(component, {}).get(size)

    def size(self, component: str, size: int, config: ShapeConfig) -> int:
        """One standard size moved to ``config``."""
        t = self.term(component, size)
        return size if t is None else config[t[0]] * t[1]

    def shape(self, component: str, shape: Iterable[int], config: ShapeConfig, key: str | None = None) -> tuple[int, ...]:
        """A standard shape (from the key table; ``key`` for the per-tensor exceptions) in ``config``."""
        out = []
        for i, s in enumerate(shape):
            t = self.term(component, s, key, i)
            out.append(s if t is None else config[t[0]] * t[1])
        return tuple(out)

    def rows(self, component: str, rows: tuple[int, int], config: ShapeConfig) -> tuple[int, int]:
        """A fused-row slice (standard bounds, e.g. ``(1024, 2048)`` = width..2·width) in ``config``."""
        return self.size(component, rows[0], config), self.size(component, rows[1], config)

    def _terms(self, component: str, std: tuple[int, ...], actual: tuple[int, ...], key: str | None = None):
        """``(dimension, value)`` votes of one tensor: each size a dimension explains, divided by its multiple."""
        if len(std) != len(actual):
            return []
        out = []
        for i, (s, a) in enumerate(zip(std, actual)):
            t = self.term(component, s, key, i)
            if t is not None and a > 0 and a % t[1] == 0:
                out.append((t[0], a // t[1]))
        return out

    def solve(self, observations: Iterable[tuple]) -> Solution:
        """Read the config off ``(component, standard shape, actual shape[, key])`` tuples.

        Each size that a dimension explains votes ``actual / multiple`` for it (sizes that do not divide
        evenly vote for nothing and fail the later shape check); the majority wins, the standard value
        on a tie.
        """
        votes: dict[str, Counter[int]] = {}
        ratios: Counter[Fraction] = Counter()
        for comp, std, actual, *key in observations:
            for name, value in self._terms(comp, tuple(std), tuple(actual), key[0] if key else None):
                votes.setdefault(name, Counter())[value] += 1
                ratios[Fraction(self.standard[name], value)] += 1
        chosen = {name: max(c, key=lambda v: (c[v], v == self.standard[name])) for name, c in votes.items()}
        ratio = max(ratios, key=lambda r: (ratios[r], r == 1)) if ratios else Fraction(1)
        return Solution(self.standard_config.replace(**chosen), frozenset(chosen), ratio)

    def in_proportion(
        self, solution: Solution, component: str, std: Iterable[int], actual: Iterable[int], key: str | None = None
    ) -> bool:
        """Do one tensor's sizes all keep the solution's common ratio to the standard?"""
        return all(
            Fraction(self.standard[name], value) == solution.ratio
            for name, value in self._terms(component, tuple(std), tuple(actual), key)
        )
