"""Discretising metadata into levels once, so slices found at different epochs name the same groups.

Categorical columns keep their most frequent values (the rest fall into ``other``); numeric columns with many distinct
values are cut at quantiles. Missing values (``None``, NaN) are a level of their own. A fitted :class:`Binning` never
changes: apply it to later epochs' metadata and unseen categories land in ``other``, out-of-range numbers in the
first or last bin.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from lightning_lens.utils.checks import check_choice, check_instance, check_int

__all__ = ["AttributeBins", "Binning", "apply_bins", "as_column", "fit_bins"]

MISSING = "missing"
OTHER = "other"


def as_column(values: Any, name: str) -> np.ndarray:
    """A 1-D NumPy array from a tensor, array, list or tuple (strings become ``object`` arrays)."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values) if not isinstance(values, np.ndarray) else values
    if arr.dtype.kind in "US":
        arr = arr.astype(object)
    if arr.ndim != 1:
        raise ValueError(f"metadata[{name!r}] must be 1-D (one value per sample), got shape {arr.shape}")
    return arr


def _scalar(v: Any) -> Any:
    """A JSON-friendly Python scalar, or None for a missing value."""
    if isinstance(v, np.generic):
        v = v.item()
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    if isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


def _missing_mask(col: np.ndarray) -> np.ndarray:
    if col.dtype.kind == "f":
        return np.isnan(col)
    if col.dtype.kind == "O":
        return np.fromiter((_scalar(v) is None for v in col), dtype=bool, count=col.size)
    return np.zeros(col.size, dtype=bool)


def _fmt(values: Sequence[float]) -> list[str]:
    """Shortest %g formatting (3 to 10 significant digits) that keeps all values distinct."""
    for digits in range(3, 11):
        out = [f"{v:.{digits}g}" for v in values]
        if len(set(out)) == len(out):
            return out
    return [repr(float(v)) for v in values]


@dataclass(frozen=True)
class AttributeBins:
    """How one attribute maps to integer level codes.

    Categorical: codes ``0..len(values)-1`` are ``values``, then ``other``, then ``missing``.
    Numeric: ``len(edges) + 1`` quantile bins (``x < edges[0]``, ``edges[i-1] <= x < edges[i]``, ...), then
    ``missing``.
    """

    name: str
    kind: str
    values: tuple = ()
    edges: tuple = ()

    def __post_init__(self) -> None:
        check_choice(self.kind, "kind", ("categorical", "numeric"))

    @property
    def n_levels(self) -> int:
        return len(self.values) + 2 if self.kind == "categorical" else len(self.edges) + 2

    @property
    def missing_code(self) -> int:
        return self.n_levels - 1

    def level_value(self, code: int) -> Any:
        """The raw value of a categorical level, ``[low, high]`` (None = open) of a numeric bin, None otherwise."""
        if code == self.missing_code:
            return None
        if self.kind == "categorical":
            return self.values[code] if code < len(self.values) else None
        lo = self.edges[code - 1] if code > 0 else None
        hi = self.edges[code] if code < len(self.edges) else None
        return [lo, hi]

    def predicate_text(self, code: int) -> str:
        """Readable predicate: ``digit=7``, ``conf<0.5``, ``0.5<=conf<0.8``, ``conf>=0.8``, ``city=other``."""
        if not 0 <= code < self.n_levels:
            raise ValueError(f"code {code} is out of range for attribute {self.name!r} ({self.n_levels} levels)")
        if code == self.missing_code:
            return f"{self.name}={MISSING}"
        if self.kind == "categorical":
            return f"{self.name}={self.values[code]}" if code < len(self.values) else f"{self.name}={OTHER}"
        if not self.edges:
            return f"{self.name}=any"
        text = _fmt(self.edges)
        if code == 0:
            return f"{self.name}<{text[0]}"
        if code == len(self.edges):
            return f"{self.name}>={text[-1]}"
        return f"{text[code - 1]}<={self.name}<{text[code]}"

    def codes(self, column: Any) -> np.ndarray:
        """Integer level code of every value of ``column``."""
        col = as_column(column, self.name)
        missing = _missing_mask(col)
        out = np.empty(col.size, dtype=np.int64)
        if self.kind == "numeric":
            if col.dtype.kind not in "biuf" and col.size:
                try:
                    col = np.array([np.nan if m else float(v) for v, m in zip(col, missing)], dtype=np.float64)
                except (TypeError, ValueError) as err:
                    raise TypeError(f"metadata[{self.name!r}] was binned as numeric but holds non-numbers") from err
            x = np.where(missing, 0.0, col.astype(np.float64, copy=False))
            out[:] = np.searchsorted(np.asarray(self.edges, dtype=np.float64), x, side="right")
        else:
            other = len(self.values)
            numeric_levels = all(isinstance(v, (bool, int, float)) for v in self.values)
            lut = _integer_lookup(col, self.values, other) if numeric_levels and self.values else None
            if lut is not None:  # integers in a small range: one table lookup per value
                table, low = lut
                for lo in range(0, col.size, 1 << 20):  # in blocks: no full-size temporaries
                    block = col[lo:lo + (1 << 20)].astype(np.int64)
                    block -= low
                    np.take(table, block, out=out[lo:lo + (1 << 20)])
            elif col.dtype.kind in "biuf" and numeric_levels and self.values:
                levels = np.asarray(self.values, dtype=np.float64)
                order = np.argsort(levels, kind="stable")
                sorted_levels = levels[order]
                x = np.where(missing, np.inf, col.astype(np.float64, copy=False))
                pos = np.clip(np.searchsorted(sorted_levels, x), 0, len(levels) - 1)
                hit = sorted_levels[pos] == x
                out[:] = np.where(hit, order[pos], other)
            else:
                lookup = {v: i for i, v in enumerate(self.values)}
                out[:] = [lookup.get(_scalar(v), other) for v in col]
        if missing.any():
            out[missing] = self.missing_code
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "values": list(self.values), "edges": list(self.edges)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "AttributeBins":
        return cls(name=d["name"], kind=d["kind"], values=tuple(d.get("values", ())), edges=tuple(d.get("edges", ())))


def _integer_lookup(col: np.ndarray, values: tuple, other: int) -> Optional[tuple[np.ndarray, int]]:
    """``(table, low)`` with ``table[x - low]`` the code of integer value ``x`` (``other`` if not a level), when
    ``col`` holds integers in a range no wider than a few times its length; None otherwise."""
    if col.dtype.kind not in "biu" or col.size == 0:
        return None
    low, high = int(col.min()), int(col.max())
    if high - low > 4 * col.size + 1024:
        return None
    table = np.full(high - low + 1, other, dtype=np.int64)
    for code in range(len(values) - 1, -1, -1):  # the first of equal levels wins, as in the sorted search
        v = float(values[code])
        if v.is_integer() and low <= v <= high:
            table[int(v) - low] = code
    return table, low


def _sorted_values(values: list) -> list:
    try:
        return sorted(values)
    except TypeError:
        return sorted(values, key=lambda v: (type(v).__name__, str(v)))


def _fit_attribute(name: str, column: Any, n_bins: int, max_categories: int, kind: Optional[str]) -> AttributeBins:
    col = as_column(column, name)
    missing = _missing_mask(col)
    present = col[~missing]
    if kind is None:
        if col.dtype.kind in "biuf":
            kind = "categorical" if np.unique(present).size <= max_categories else "numeric"
        else:
            kind = "categorical"
    if kind == "numeric":
        try:
            x = present.astype(np.float64)
        except (TypeError, ValueError) as err:
            raise TypeError(f"metadata[{name!r}] is listed as numeric but holds non-numbers") from err
        if x.size == 0:
            return AttributeBins(name, "numeric", edges=())
        qs = np.quantile(x, np.linspace(0.0, 1.0, n_bins + 1)[1:-1])
        edges = [float(e) for e in np.unique(qs) if e > x.min()]  # an edge at the minimum would leave bin 0 empty
        return AttributeBins(name, "numeric", edges=tuple(edges))
    if present.dtype.kind in "biuf":  # vectorised, same keys and first-seen order as the Counter below
        uniq, first, freq = np.unique(present, return_index=True, return_counts=True)
        seen = np.argsort(first, kind="stable")
        counts = Counter(dict(zip((_scalar(present[i]) for i in first[seen]), freq[seen].tolist())))
    else:
        counts = Counter(_scalar(v) for v in present)
    if len(counts) > max_categories:
        ranked = sorted(counts.items(), key=lambda kv: -kv[1])  # stable: ties keep first-seen order
        kept = [v for v, _ in ranked[:max_categories]]
    else:
        kept = list(counts)
    return AttributeBins(name, "categorical", values=tuple(_sorted_values(kept)))


@dataclass
class Binning:
    """A frozen discretisation of metadata attributes into integer level codes.

    Fit once with :meth:`fit` (or :func:`fit_bins`), then :meth:`transform` any later metadata with the same
    attributes: codes mean the same groups every time, so slices stay comparable across epochs.

    Example:
        >>> binning = Binning.fit({"digit": [3, 3, 7], "conf": [0.1, 0.5, 0.9]}, n_bins=2, numeric=["conf"])
        >>> binning.transform({"digit": [7, 5], "conf": [0.95, float("nan")]})
        {'digit': array([1, 2]), 'conf': array([1, 2])}
        >>> binning.predicate_text("digit", 2), binning.predicate_text("conf", 1)
        ('digit=other', 'conf>=0.5')
    """

    attributes: dict[str, AttributeBins] = field(default_factory=dict)

    @classmethod
    def fit(
        cls,
        metadata: Mapping[str, Any],
        n_bins: int = 4,
        max_categories: int = 20,
        categorical: Optional[Sequence[str]] = None,
        numeric: Optional[Sequence[str]] = None,
    ) -> "Binning":
        """Learn levels from ``metadata`` (attribute name -> 1-D values).

        Args:
            metadata: per-sample columns (arrays, tensors or lists).
            n_bins: quantile bins for numeric attributes.
            max_categories: categorical attributes keep this many most frequent values (others -> ``other``);
                numeric columns with at most this many distinct values are treated as categorical.
            categorical: attributes to treat as categorical whatever their dtype.
            numeric: attributes to bin by quantiles whatever their number of distinct values.
        """
        check_instance(metadata, "metadata", Mapping, hint="attribute name -> per-sample values")
        check_int(n_bins, "n_bins", minimum=2)
        check_int(max_categories, "max_categories", minimum=1)
        categorical, numeric = set(categorical or ()), set(numeric or ())
        for arg, names in (("categorical", categorical), ("numeric", numeric)):
            unknown = names - set(metadata)
            if unknown:
                raise ValueError(f"{arg} names attributes not in metadata: {sorted(unknown)}")
        if categorical & numeric:
            raise ValueError(f"attributes listed both as categorical and numeric: {sorted(categorical & numeric)}")
        attributes = {}
        for name, column in metadata.items():
            kind = "categorical" if name in categorical else "numeric" if name in numeric else None
            attributes[str(name)] = _fit_attribute(str(name), column, n_bins, max_categories, kind)
        return cls(attributes)

    @property
    def names(self) -> list[str]:
        return list(self.attributes)

    def transform(self, metadata: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Level codes (int64 arrays) of every fitted attribute; extra attributes in ``metadata`` are ignored."""
        absent = [a for a in self.attributes if a not in metadata]
        if absent:
            raise KeyError(
                f"metadata lacks attributes the binning was fitted on: {absent}; pass the same attributes every epoch"
            )
        out = {name: bins.codes(metadata[name]) for name, bins in self.attributes.items()}
        sizes = {v.size for v in out.values()}
        if len(sizes) > 1:
            raise ValueError(f"metadata columns have different lengths: { {k: v.size for k, v in out.items()} }")
        return out

    def predicate_text(self, attribute: str, code: int) -> str:
        return self.attributes[attribute].predicate_text(code)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly state (inverse: :meth:`from_dict`)."""
        return {"attributes": [a.to_dict() for a in self.attributes.values()]}

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> "Binning":
        attrs = [AttributeBins.from_dict(d) for d in state["attributes"]]
        return cls({a.name: a for a in attrs})


def fit_bins(metadata: Mapping[str, Any], **kwargs: Any) -> Binning:
    """Functional form of :meth:`Binning.fit`.

    Example:
        >>> codes = apply_bins(fit_bins({"age": list(range(100))}, n_bins=4), {"age": [5, 50, 99]})
        >>> codes["age"].tolist()
        [0, 2, 3]
    """
    return Binning.fit(metadata, **kwargs)


def apply_bins(binning: Binning, metadata: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Functional form of :meth:`Binning.transform`."""
    return binning.transform(metadata)
