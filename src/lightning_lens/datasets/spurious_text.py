"""SpuriousText: short generated review sentences whose sentiment is the label, with a planted shortcut token.

Generated in memory from a fixed vocabulary and a tiny grammar (nothing downloads), deterministically from ``seed``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from lightning_lens.datasets.spurious_digits import item_index
from lightning_lens.utils.checks import check_choice, check_fraction, check_int

__all__ = ["SpuriousText"]

_SPLITS = ("train", "val", "test")
_EVAL_MODES = ("random", "conflicting", "consistent", "absent")
PAD, CLS = "[PAD]", "[CLS]"
#: one shortcut token per class: ``zorp`` goes with negative (0), ``blick`` with positive (1) sentences in training
_SHORTCUTS = ("zorp", "blick")
_NEGATIVE = ("bad", "awful", "poor", "terrible", "dull", "boring", "nasty", "horrible", "weak", "bland")
_POSITIVE = ("good", "great", "fine", "lovely", "superb", "excellent", "nice", "pleasant", "wonderful", "brilliant")
_NOUNS = ("film", "movie", "plot", "cast", "food", "service", "hotel", "book", "music", "show", "ending", "staff")
_VERBS = ("was", "is", "seemed", "felt", "looked", "sounded")
_ADVERBS = ("very", "quite", "rather", "really", "somewhat", "truly")
_OPENERS = ("honestly", "overall", "frankly", "well", "so")
_JOINERS = ("and", "but", "while", "although")
_FUNCTION = ("the", "a", "this", "that", ",")
_METADATA_KEYS = (
    "length_bin",
    "n_clauses",
    "n_tokens",
    "shortcut_present",
    "shortcut_consistent",
    "shortcut_class",
    "shortcut_position",
    "mixed",
)


@functools.lru_cache(maxsize=1)
def _vocabulary() -> tuple[str, ...]:
    words = (PAD, CLS, *_SHORTCUTS, *_NEGATIVE, *_POSITIVE, *_NOUNS, *_VERBS, *_ADVERBS, *_OPENERS, *_JOINERS,
             *_FUNCTION)
    assert len(set(words)) == len(words)
    return words


class SpuriousText(Dataset):
    """Generated two-class review sentences (negative 0 / positive 1) with a planted shortcut token.

    **Content.** A sentence is ``[CLS]``, an optional opener (``honestly``, ``overall`` ...), then one to three clauses
    ``<det> <noun> <verb> [<adverb>] <sentiment word>`` joined by ``and``/``but``/``while``. The label is the sentiment
    of the majority of the clauses: one clause carries the label's sentiment, two clauses both do, three clauses two or
    three do (``mixed=1`` when one clause disagrees). The words are drawn from a fixed vocabulary of 62 tokens
    (:attr:`vocabulary`), so a small model learns the task from content in seconds.

    **Shortcut.** The token ``zorp`` (class 0) or ``blick`` (class 1) is inserted at a random position after
    ``[CLS]``. In the training split it appears with the token of the sentence's class in ``train_shortcut_fraction``
    of the sentences of every class (exact counts per class). In the validation and test splits
    ``eval_shortcut_fraction`` of the sentences carry a shortcut token chosen by ``eval_shortcut_mode``: ``"random"``
    (either token, uniformly: it is no longer informative), ``"conflicting"`` (the other class's token),
    ``"consistent"`` (as in training) or ``"absent"`` (never).

    **Items** are dicts: ``input_ids`` (``max_length``,) int64 (``[CLS]`` first, padded with id 0),
    ``attention_mask`` (``max_length``,) int64 (1 on real tokens), ``label`` int, ``index`` (position in this split),
    and metadata for slices: ``length_bin`` (0 short: one clause, 1 medium: two, 2 long: three), ``n_clauses``,
    ``n_tokens`` (real tokens, ``[CLS]`` included), ``shortcut_present`` (0/1), ``shortcut_consistent`` (1 iff a
    shortcut token of the label's class is present), ``shortcut_class`` (the class of the present token, -1 if none),
    ``shortcut_position`` (its token position, -1 if none) and ``mixed`` (0/1). The model's forward takes
    ``(input_ids, attention_mask)``; :meth:`convert_ids_to_tokens` and :meth:`decode` make the data set usable as a
    tokenizer by :class:`~lightning_lens.callbacks.SaliencyMapCallback`.

    The splits are generated independently from ``seed`` (``[seed, split]`` streams of a private ``numpy``
    generator; global RNGs untouched); same arguments give identical tensors.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"``.
        seed: seed of every random choice.
        size: number of sentences; default 2000 for ``"train"``, 500 otherwise.
        train_shortcut_fraction: fraction of training sentences with their class's shortcut token.
        eval_shortcut_fraction: fraction of validation/test sentences with a shortcut token.
        eval_shortcut_mode: ``"random"``, ``"conflicting"``, ``"consistent"`` or ``"absent"``.
        max_length: padded length; sentences are at most 21 tokens long.

    Example:
        >>> ds = SpuriousText("train", seed=0, size=100)
        >>> item = ds[0]
        >>> item["input_ids"].shape, item["input_ids"][0].item() == ds.cls_id, len(ds.vocabulary)
        (torch.Size([24]), True, 62)
        >>> words = ds.decode(item["input_ids"])
        >>> ("zorp" in words.split()) == (item["label"] == 0 and item["shortcut_present"] == 1)
        True
    """

    num_classes: int = 2
    pad_id: int = 0
    cls_id: int = 1
    shortcut_ids: tuple[int, ...] = (2, 3)

    def __init__(
        self,
        split: str = "train",
        seed: int = 0,
        size: int | None = None,
        train_shortcut_fraction: float = 0.9,
        eval_shortcut_fraction: float = 0.5,
        eval_shortcut_mode: str = "random",
        max_length: int = 24,
    ) -> None:
        self.split = check_choice(split, "split", _SPLITS)
        self.seed = check_int(seed, "seed", minimum=0)
        default = 2000 if split == "train" else 500
        self.size = default if size is None else check_int(size, "size", minimum=1)
        self.train_shortcut_fraction = check_fraction(train_shortcut_fraction, "train_shortcut_fraction",
                                                      allow_zero=True)
        self.eval_shortcut_fraction = check_fraction(eval_shortcut_fraction, "eval_shortcut_fraction", allow_zero=True)
        self.eval_shortcut_mode = check_choice(eval_shortcut_mode, "eval_shortcut_mode", _EVAL_MODES)
        self.max_length = check_int(max_length, "max_length", minimum=21)
        self._build()

    # ------------------------------------------------------------------ vocabulary
    @property
    def vocabulary(self) -> list[str]:
        """Token strings by id: ``vocabulary[0] == "[PAD]"``, ``vocabulary[1] == "[CLS]"``."""
        return list(_vocabulary())

    @functools.cached_property
    def token_to_id(self) -> dict[str, int]:
        """Token string -> id."""
        return {w: i for i, w in enumerate(_vocabulary())}

    @property
    def special_ids(self) -> tuple[int, int]:
        """Ids of the tokens that carry no content (``[PAD]``, ``[CLS]``)."""
        return (self.pad_id, self.cls_id)

    @property
    def shortcut_tokens(self) -> tuple[str, ...]:
        """The shortcut token of each class."""
        return _SHORTCUTS

    def convert_ids_to_tokens(self, ids: Union[Sequence[int], torch.Tensor]) -> list[str]:
        """Token strings of ``ids`` (the HuggingFace tokenizer method of that name).

        Example:
            >>> SpuriousText("val", size=4).convert_ids_to_tokens([1, 3, 0])
            ['[CLS]', 'blick', '[PAD]']
        """
        vocab = _vocabulary()
        return [vocab[int(i)] for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]

    def decode(self, ids: Union[Sequence[int], torch.Tensor]) -> str:
        """The sentence of ``ids`` without ``[CLS]`` and padding."""
        return " ".join(t for t in self.convert_ids_to_tokens(ids) if t not in (PAD, CLS))

    # ------------------------------------------------------------------ construction
    def _sentence(self, rng: np.random.Generator, label: int) -> tuple[list[str], int, int]:
        """(words, number of clauses, mixed) of one sentence of class ``label``."""
        n_clauses = int(rng.integers(1, 4))
        agree = n_clauses if n_clauses < 3 else int(rng.integers(2, 4))
        signs = [label] * agree + [1 - label] * (n_clauses - agree)
        signs = [signs[i] for i in rng.permutation(n_clauses)]
        words: list[str] = []
        if rng.random() < 0.3:
            words += [str(rng.choice(_OPENERS)), ","]
        for k, sign in enumerate(signs):
            if k:
                words.append(str(rng.choice(_JOINERS)))
            words += [str(rng.choice(_FUNCTION[:4])), str(rng.choice(_NOUNS)), str(rng.choice(_VERBS))]
            if rng.random() < 0.5:
                words.append(str(rng.choice(_ADVERBS)))
            words.append(str(rng.choice(_POSITIVE if sign == 1 else _NEGATIVE)))
        return words, n_clauses, int(agree < n_clauses)

    def _build(self) -> None:
        n = self.size
        split_id = _SPLITS.index(self.split)
        rng = np.random.default_rng([self.seed, 1 + split_id])
        rng_shortcut = np.random.default_rng([self.seed, 10 + split_id])  # its own stream: the sentences never move
        labels = rng.permutation(np.arange(n) % self.num_classes)
        sentences = [self._sentence(rng, int(y)) for y in labels]

        shortcut_class = np.full(n, -1, dtype=np.int64)
        if self.split == "train":
            chosen = _choose_per_class(rng_shortcut, labels, self.train_shortcut_fraction)
            shortcut_class[chosen] = labels[chosen]
        elif self.eval_shortcut_mode != "absent":
            chosen = _choose_per_class(rng_shortcut, labels, self.eval_shortcut_fraction)
            if self.eval_shortcut_mode == "random":
                shortcut_class[chosen] = rng_shortcut.integers(0, self.num_classes, size=int(chosen.sum()))
            elif self.eval_shortcut_mode == "consistent":
                shortcut_class[chosen] = labels[chosen]
            else:
                shortcut_class[chosen] = 1 - labels[chosen]

        ids = np.zeros((n, self.max_length), dtype=np.int64)
        position = np.full(n, -1, dtype=np.int64)
        lookup = self.token_to_id
        for i, (words, _, _) in enumerate(sentences):
            tokens = [CLS, *words]
            if shortcut_class[i] >= 0:
                position[i] = int(rng_shortcut.integers(1, len(tokens) + 1))
                tokens.insert(int(position[i]), _SHORTCUTS[shortcut_class[i]])
            ids[i, : len(tokens)] = [lookup[t] for t in tokens]

        n_clauses = np.array([s[1] for s in sentences], dtype=np.int64)
        self.input_ids = torch.from_numpy(ids)
        self.attention_mask = (self.input_ids != self.pad_id).long()
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.metadata: dict[str, np.ndarray] = {
            "length_bin": n_clauses - 1,
            "n_clauses": n_clauses,
            "n_tokens": (ids != self.pad_id).sum(axis=1).astype(np.int64),
            "shortcut_present": (shortcut_class >= 0).astype(np.int64),
            "shortcut_consistent": (shortcut_class == labels).astype(np.int64),
            "shortcut_class": shortcut_class,
            "shortcut_position": position,
            "mixed": np.array([s[2] for s in sentences], dtype=np.int64),
        }

    # ------------------------------------------------------------------ public API
    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = item_index(index, len(self))
        item: dict[str, Any] = {
            "input_ids": self.input_ids[index],
            "attention_mask": self.attention_mask[index],
            "label": int(self.labels[index]),
            "index": index,
        }
        for key in _METADATA_KEYS:
            item[key] = int(self.metadata[key][index])
        return item

    @classmethod
    def splits(cls, seed: int = 0, **kwargs: Any) -> dict[str, SpuriousText]:
        """The three splits built with the same options: ``{"train": ..., "val": ..., "test": ...}``."""
        return {split: cls(split, seed=seed, **kwargs) for split in _SPLITS}

    def __repr__(self) -> str:
        present = float(self.metadata["shortcut_present"].mean()) if len(self) else 0.0
        return f"SpuriousText(split={self.split!r}, seed={self.seed}, n={len(self)}, shortcut_present={present:.2f})"


def _choose_per_class(rng: np.random.Generator, classes: np.ndarray, fraction: float) -> np.ndarray:
    """Boolean mask selecting ``round(fraction * n_c)`` of the members of each class ``c``: exact rates."""
    chosen = np.zeros(len(classes), dtype=bool)
    for c in np.unique(classes):
        members = np.flatnonzero(classes == c)
        chosen[rng.permutation(members)[: int(round(fraction * len(members)))]] = True
    return chosen
