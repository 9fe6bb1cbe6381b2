"""The :class:`Slice` record: a named subgroup, its members and its statistics; JSON round trip."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Optional

import numpy as np

from lightning_lens.slices.binning import Binning

__all__ = ["Predicate", "Slice", "slices_from_json", "slices_to_json"]


@dataclass(frozen=True)
class Predicate:
    """``attribute`` takes level ``code`` of a :class:`~lightning_lens.slices.Binning`.

    Attributes:
        attribute: metadata attribute name.
        code: level code in the binning the slice was found with.
        text: readable form (``digit=7``, ``0.5<=conf<0.8``, ``city=missing``).
        value: the raw categorical value, ``[low, high]`` for a numeric bin (None = open end), None for
            ``missing`` / ``other``.
    """

    attribute: str
    code: int
    text: str
    value: Any = None

    def __str__(self) -> str:
        return self.text

    def to_dict(self) -> dict[str, Any]:
        return {"attribute": self.attribute, "code": int(self.code), "text": self.text, "value": self.value}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Predicate":
        value = d.get("value")
        return cls(attribute=d["attribute"], code=int(d["code"]), text=d["text"], value=value)


@dataclass
class Slice:
    """A subgroup of the data where the model errs more than elsewhere, with its statistics.

    Attributes:
        name: readable name: the predicates joined by `` & `` (``digit=7 & thickness=2``), or ``cluster 3 (...)``.
        kind: ``"metadata"`` (a conjunction of predicates) or ``"embedding"`` (a cluster of embeddings).
        predicates: the conjunction (empty for embedding slices).
        indices: members, as positions in the arrays passed to ``find_slices`` (or the ``ids`` given there).
        size: number of members.
        fraction: ``size / n``.
        errors: number of errors in the slice (sum of losses when slices were found on losses).
        error_rate: ``errors / size`` (mean loss for loss-based slices).
        ci_low, ci_high: 95% Wilson interval of the error rate (t interval of the mean loss).
        rest_rate: error rate of the data outside the slice.
        difference: ``error_rate - rest_rate``.
        ratio: ``error_rate / rest_rate`` (inf when the rest has no errors).
        p_value: one-sided test that the slice errs more than the rest (Fisher exact, G-test or Welch t).
        q_value: Benjamini-Hochberg (or -Yekutieli) adjusted p-value over every candidate tested.
        score: SliceLine score ``a (error_rate / mean_rate - 1) - (1 - a) (n / size - 1)``.
        mean_loss: mean per-sample loss in the slice, when losses were given.
        measure: ``"error"`` or ``"loss"``: what ``errors``/``error_rate`` count.
        description: for embedding slices, the over-represented metadata values (``text``, ``share``, ``lift``,
            ``p_value``).
        cluster: for embedding slices, the cluster number.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> meta = {"site": rng.choice(["a", "b"], 2000), "age": rng.integers(0, 3, 2000)}
        >>> errors = rng.random(2000) < np.where((meta["site"] == "b") & (meta["age"] == 2), 0.5, 0.1)
        >>> from lightning_lens.slices import find_slices
        >>> s = find_slices(errors, meta)[0]
        >>> s.name, s.size == len(s.indices), [p.text for p in s.predicates]
        ('site=b & age=2', True, ['site=b', 'age=2'])
    """

    name: str
    kind: str
    predicates: tuple[Predicate, ...]
    indices: np.ndarray
    size: int
    fraction: float
    errors: float
    error_rate: float
    ci_low: float
    ci_high: float
    rest_rate: float
    difference: float
    ratio: float
    p_value: float
    q_value: float
    score: float
    mean_loss: Optional[float] = None
    measure: str = "error"
    description: tuple[dict, ...] = ()
    cluster: Optional[int] = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def level(self) -> int:
        """Number of predicates (0 for embedding slices)."""
        return len(self.predicates)

    @property
    def accuracy(self) -> float:
        """``1 - error_rate`` (meaningful for 0/1 errors)."""
        return 1.0 - self.error_rate

    def mask(self, metadata: Mapping[str, Any], binning: Binning) -> np.ndarray:
        """Boolean membership of a metadata slice on other data (e.g. a later epoch), under the same ``binning``."""
        if self.kind != "metadata":
            raise ValueError(f"slice {self.name!r} is an embedding cluster; track it by its member indices instead")
        columns = {}
        for p in self.predicates:
            if p.attribute not in binning.attributes:
                raise KeyError(f"the binning has no attribute {p.attribute!r} used by slice {self.name!r}")
            if p.attribute not in metadata:
                raise KeyError(f"metadata lacks attribute {p.attribute!r} used by slice {self.name!r}")
            columns[p.attribute] = binning.attributes[p.attribute].codes(metadata[p.attribute])
        if not columns:
            raise ValueError("a metadata slice needs at least one predicate")
        out = np.ones(next(iter(columns.values())).size, dtype=bool)
        for p in self.predicates:
            out &= columns[p.attribute] == p.code
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (non-finite floats become the strings ``"inf"``, ``"-inf"``, ``"nan"``)."""
        d: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "predicates":
                v = [p.to_dict() for p in v]
            elif f.name == "indices":
                v = [int(i) for i in np.asarray(v).ravel()]
            elif f.name == "description":
                v = [dict(x) for x in v]
            d[f.name] = _encode(v)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Slice":
        known = {f.name for f in fields(cls)}
        kwargs = {k: _decode(v) for k, v in d.items() if k in known}
        kwargs["predicates"] = tuple(Predicate.from_dict(p) for p in d.get("predicates", ()))
        kwargs["indices"] = np.asarray(d.get("indices", ()), dtype=np.int64)
        kwargs["description"] = tuple(dict(x) for x in kwargs.get("description", ()))
        return cls(**kwargs)

    def __repr__(self) -> str:
        return (
            f"Slice({self.name!r}, size={self.size}, error_rate={self.error_rate:.3f} "
            f"[{self.ci_low:.3f}, {self.ci_high:.3f}], rest={self.rest_rate:.3f}, q={self.q_value:.2g}, "
            f"score={self.score:.3f})"
        )


def _encode(v: Any) -> Any:
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, dict):
        return {str(k): _encode(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_encode(x) for x in v]
    if isinstance(v, np.ndarray):
        return [_encode(x) for x in v.tolist()]
    return v


def _decode(v: Any) -> Any:
    if v in ("nan", "inf", "-inf") and isinstance(v, str):
        return float(v)
    if isinstance(v, dict):
        return {k: _decode(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_decode(x) for x in v]
    return v


def slices_to_json(slices: Sequence[Slice], indent: Optional[int] = None) -> str:
    """Serialize slices (with their members and statistics) to a JSON string.

    Example:
        >>> s = Slice("g=1", "metadata", (Predicate("g", 1, "g=1", 1),), np.array([3, 4]), 2, 0.2, 2.0, 1.0, 0.34, 1.0,
        ...           0.1, 0.9, 10.0, 0.01, 0.02, 1.5)
        >>> back = slices_from_json(slices_to_json([s]))[0]
        >>> back.name, back.indices.tolist(), back.predicates == s.predicates
        ('g=1', [3, 4], True)
    """
    return json.dumps({"slices": [s.to_dict() for s in slices]}, indent=indent)


def slices_from_json(text: str) -> list[Slice]:
    """Inverse of :func:`slices_to_json`."""
    obj = json.loads(text)
    items = obj["slices"] if isinstance(obj, dict) else obj
    return [Slice.from_dict(d) for d in items]
