"""Merging models whose tokenizers differ: ``tokenizer_source: base | union | <model>`` as mergekit
defines it.

The output tokenizer is the base model's, the union of every model's vocabulary (the base's tokens in
its order, then every other model's tokens it lacks, then their added tokens), or a named model's.
Each model's vocabulary tensors (``embed_tokens``, ``lm_head``: one row per token) are then re-indexed
to the output vocabulary before the merge method sees them, so a token's rows are merged with each
other whatever their ids were. A token some model lacks gets, in that model, a stand-in row (mergekit's
rule): the one model that has it gives its row; the base model's row when the base has it; else the
average of the rows of the models that have it; zeros when none does. The merge then runs as usual.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from evomerge.merge.io import Checkpoint

VOCABULARY_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
"""Tensors with one row per token (axis 0)."""


class VocabularyError(ValueError):
    """Vocabularies that cannot be aligned (names the model and the problem)."""


def _tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, use_fast=True)
    except (OSError, ValueError) as exc:
        raise VocabularyError(f"{path}: its tokenizer cannot be loaded ({exc})") from None


def union_tokenizer(base: Any, others: Mapping[str, tuple[Any, int]], base_size: int) -> Any:
    """The base tokenizer plus every other tokenizer's tokens it lacks (within each model's vocab_size),
    plain tokens first, then added tokens, in mergekit's order."""
    from transformers import AutoTokenizer

    plain: dict[str, int] = {}
    added: dict[str, Any] = {}
    for tokenizer, size in [(base, base_size), *others.values()]:
        specials = tokenizer.added_tokens_decoder
        contents = {info.content for info in specials.values()}
        for token, index in tokenizer.get_vocab().items():
            if index < size and token not in contents and token not in plain:
                plain[token] = len(plain)
        for index, info in specials.items():
            if index < size and info.content not in added:
                added[info.content] = info
    with tempfile.TemporaryDirectory() as folder:  # a copy: the base's tokenizer object stays as it is
        base.save_pretrained(folder)
        out = AutoTokenizer.from_pretrained(folder, use_fast=True)
    known = base.get_vocab()
    for token in plain:
        if token not in added and token not in known:
            out.add_tokens(token)
    for info in added.values():
        out.add_tokens(info)
    return out


@dataclasses.dataclass
class VocabularyAlignment:
    """The output tokenizer, and per model which of its rows each output token takes (-1: none)."""

    tokenizer: Any
    vocab: dict[str, int]
    rows: dict[str, list[int]]
    """Model reference -> for each output token id, that model's row (-1 where it lacks the token)."""
    base_model: str | None
    """The recipe's base model, whose row stands in for a token others lack (None: no base; averages)."""
    _stand_ins: dict[str, dict[int, torch.Tensor]] = dataclasses.field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.vocab)

    def stand_ins(self, name: str, load: Callable[[], Mapping[str, torch.Tensor]]) -> dict[int, torch.Tensor]:
        """For tensor ``name``: output token id -> the row models lacking that token use (mergekit's rule),
        computed once from ``load()`` (every model's stored tensor ``name``)."""
        if name in self._stand_ins:
            return self._stand_ins[name]
        tensors = load()
        models = list(tensors)
        dtype = tensors[models[0]].dtype
        for tensor in tensors.values():
            dtype = torch.promote_types(dtype, tensor.dtype)
        out: dict[int, torch.Tensor] = {}
        for token_id in range(self.size):
            having = [m for m in models if self.rows[m][token_id] >= 0]
            if len(having) == len(models):
                continue
            if not having:
                out[token_id] = torch.zeros(tensors[models[0]].shape[1:], dtype=dtype)
            elif len(having) == 1:
                out[token_id] = tensors[having[0]][self.rows[having[0]][token_id]].to(dtype)
            elif self.base_model in models and self.rows[self.base_model][token_id] >= 0:
                out[token_id] = tensors[self.base_model][self.rows[self.base_model][token_id]].to(dtype)
            else:
                total = torch.zeros(tensors[models[0]].shape[1:], dtype=dtype)
                for m in having:
                    total = total + tensors[m][self.rows[m][token_id]]
                out[token_id] = total / len(having)
        self._stand_ins[name] = out
        return out


_ALIGNMENTS: dict[tuple[Any, ...], VocabularyAlignment | None] = {}
"""Alignments already built, by (source, anchor, base, the models' directories): a search builds one
plan per candidate over the same models, and the tokenizers, permutations and stand-in rows do not change."""


def align_vocabularies(
    source: str, anchor: str, base_model: str | None, checkpoints: Mapping[str, Checkpoint]
) -> VocabularyAlignment | None:
    """The alignment ``tokenizer_source`` asks for, or None when every model already has the output
    vocabulary (nothing to re-index). ``source``: base, union, or a model reference (a key of
    ``checkpoints``) or directory; ``anchor``: the model whose tokenizer is "base" (the recipe's base
    model, else its first model); ``base_model``: the recipe's base model, or None."""
    files = sorted(
        (ref, str(ckpt.path), (ckpt.path / "config.json").stat().st_mtime_ns) for ref, ckpt in checkpoints.items()
    )
    key = (source, anchor, base_model, tuple(files))
    if key not in _ALIGNMENTS:
        _ALIGNMENTS[key] = _align(source, anchor, base_model, checkpoints)
    return _ALIGNMENTS[key]


def _align(
    source: str, anchor: str, base_model: str | None, checkpoints: Mapping[str, Checkpoint]
) -> VocabularyAlignment | None:
    tokenizers = {ref: _tokenizer(ckpt.path) for ref, ckpt in checkpoints.items()}
    sizes = {ref: int(ckpt.config.get("vocab_size") or len(tokenizers[ref])) for ref, ckpt in checkpoints.items()}
    base = tokenizers[anchor]
    if any(index >= sizes[anchor] for index in base.get_vocab().values()):
        raise VocabularyError(
            f"{anchor}: its tokenizer has ids beyond its vocab_size {sizes[anchor]}; such a model cannot anchor "
            "a vocabulary merge"
        )
    if source == "base":
        out = base
    elif source == "union":
        others = {ref: (tok, sizes[ref]) for ref, tok in tokenizers.items() if ref != anchor}
        out = union_tokenizer(base, others, sizes[anchor])
    elif source in tokenizers:
        out = tokenizers[source]
    elif Path(source).is_dir():
        out = _tokenizer(Path(source))
    else:
        raise VocabularyError(
            f"tokenizer_source: {source!r} is not base, union, one of the recipe's models or a model directory"
        )
    vocab = out.get_vocab()
    rows: dict[str, list[int]] = {}
    for ref, tokenizer in tokenizers.items():
        theirs = tokenizer.get_vocab()
        row = [-1] * len(vocab)
        for token, index in vocab.items():
            original = theirs.get(token, -1)
            row[index] = original if original < sizes[ref] else -1
        rows[ref] = row
    if all(row == list(range(len(vocab))) and sizes[ref] == len(vocab) for ref, row in rows.items()):
        return None
    return VocabularyAlignment(out, vocab, rows, base_model)


class AlignedCheckpoint(Checkpoint):
    """A checkpoint whose vocabulary tensors are read re-indexed to the output vocabulary (stand-in
    rows for tokens it lacks, from its peers: the other models of the merge)."""

    def __init__(self, inner: Checkpoint, ref: str, alignment: VocabularyAlignment, peers: Mapping[str, Checkpoint]):
        self.__dict__.update(inner.__dict__)  # a view: same files, config and tensor infos
        self.inner, self.ref, self.alignment, self.peers = inner, ref, alignment, peers
        self.tensors = dict(inner.tensors)
        for name in VOCABULARY_TENSORS:
            info = inner.tensors.get(name)
            if info is not None:
                self.tensors[name] = dataclasses.replace(info, shape=(alignment.size, *info.shape[1:]))
        self.config = {**inner.config, "vocab_size": alignment.size}

    def get(self, name: str) -> torch.Tensor:
        if name not in VOCABULARY_TENSORS:
            return self.inner.get(name)
        own = self.inner.get(name)
        raw = [(ref, getattr(peer, "inner", peer)) for ref, peer in self.peers.items()]
        holders = {ref: ckpt for ref, ckpt in raw if name in ckpt.tensors}
        stand_ins = self.alignment.stand_ins(name, lambda: {ref: ckpt.get(name) for ref, ckpt in holders.items()})
        dtype = own.dtype
        for ckpt in holders.values():
            dtype = torch.promote_types(dtype, ckpt.tensors[name].dtype)
        out = torch.zeros((self.alignment.size, *own.shape[1:]), dtype=dtype)
        rows = torch.tensor(self.alignment.rows[self.ref])
        present = rows >= 0
        out[present] = own[rows[present]].to(dtype)
        missing = [token_id for token_id in torch.nonzero(~present).flatten().tolist() if token_id in stand_ins]
        if missing:
            out[missing] = torch.stack([stand_ins[token_id] for token_id in missing]).to(dtype)
        return out

    def stored(self, name: str) -> bool:
        return name not in VOCABULARY_TENSORS and self.inner.stored(name)

    def close(self) -> None:
        pass  # the wrapped checkpoint is closed by whoever opened it

    def __repr__(self) -> str:
        return f"AlignedCheckpoint({self.inner!r})"


def aligned_checkpoints(alignment: VocabularyAlignment, checkpoints: Mapping[str, Checkpoint]) -> dict[str, Checkpoint]:
    """Every checkpoint as an ``AlignedCheckpoint``, each with the others as its peers."""
    views: dict[str, Checkpoint] = {}
    for ref, ckpt in checkpoints.items():
        views[ref] = AlignedCheckpoint(ckpt, ref, alignment, views)
    return views
