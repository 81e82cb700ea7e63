"""Zero-shot recommendation by description: a request's free-text ``query`` (DESIGN.md §5.4).

A ``rec-requests`` record may carry ``query`` ("Film-Noir movies", "quiet
sci-fi with robots").  Its candidates (or the whole catalog) are then ranked
by how well each item matches the text, and, when the user has a history and
a version is live, by that blended with the model's score.

What a query is matched against
    Each item's *document*, :func:`item_document`: its categories, then its
    text (``"Animation, Children's, Comedy: Toy Story (1995)"``; the text
    alone when it has no category).  Categories come first so that they
    survive the truncation at ``max_text_len`` tokens.  They are part of the
    item's record on ``items``, so an agent that holds the catalog holds them:
    on MovieLens the texts are titles only and the genres live in the
    categories, and a query matched against titles alone found 0.34 of its
    genre in the top 10, against 0.93 with the categories in the document
    (``benchmarks/zero_shot.py``, column ``text only``).

The text space: the query is encoded the way the item texts are
    A :class:`TextSpace` is an encoder, its tokenizer, the truncation
    (``max_text_len``) and the pooling (mean or CLS) of an item tower: the
    pooled vector an :class:`~trainer.towers.ItemTower` computes for a text
    *before* its projection (the same function as ``ItemTower.encode_pooled``;
    a unit test checks they agree).  Queries and documents go through the same
    space, so they live in the same space.

    * A live version: the version's own item-tower encoder and settings.
      With the trainer's default (the whole encoder frozen, no LoRA) those
      are the pretrained weights, so the space's *signature* is the same for
      every such version and for the no-version space below: document
      vectors computed before the first version, or under an older one, are
      reused, not recomputed.  A version that tunes encoder layers or LoRA
      has its own signature and its documents are encoded with its weights.
    * No version yet (the popularity fallback): the pretrained encoder as a
      fresh default model has it (``ModelConfig()``: the offline
      all-MiniLM-L6-v2, 32 tokens, mean pooling), built once, lazily, on the
      first query request; ``model_version`` is ``"fallback:query"``.

    Not the version's 64-wide projected item vectors: the projection is
    fitted to click prediction over the item *texts* (its principal basis
    comes from the titles), and it keeps little of what a description
    asks for: the same MovieLens version ranked 0.68 of the genre in the top
    10 through its projection (0.38 against its item vectors) against 0.93
    in the encoder's space (columns ``proj docs`` and ``item vecs`` of the
    benchmark).

Relevance
    ``cos(q - m, d_i - m)``: the cosine of the query's and each document's
    pooled vectors, both centred on the catalog's mean document vector ``m``
    (sentence vectors share one dominant direction; the item tower centres on
    the catalog mean for the same reason).  An item that left the catalog
    while still in the snapshot scores -1.

Combination (:func:`blend`)
    A user with a known history, while a version is live:
    ``score = (1 - w) * z(relevance) + w * z(model score)``, each z-scored
    over the request's candidates (mean 0, standard deviation 1: the cosine
    and the logit have unrelated scales), ``w`` = ``query_model_weight``.
    Otherwise (a new user, or no version): the relevance alone.  The default
    ``w = 0.5`` was chosen by measurement on MovieLens (1,500 users with a
    history asking for a genre of the movie they clicked next,
    ``benchmarks/zero_shot.py``): the next click was in the top 10 for 0.239
    of them at w = 0.5, against 0.069 for the query alone (w = 0) and 0.071
    for the model alone (w = 1), with 0.90 of the top 10 in the asked genre
    (0.96 at w = 0, 0.32 at w = 1).  w = 0.6 tied (0.240, standard error
    0.011) with less of the genre (0.85), so 0.5 it is.

Cost and bounds
    The document vectors of the snapshot's catalog are computed on the
    scoring thread for the first query request (the MiniLM built and 1,682
    MovieLens documents encoded: 60 s with 2 threads on the busy 2-core
    development machine; the requests queued behind it wait that long, once),
    then only for new or changed items.  They take catalog x encoder width x
    4 bytes per text space (at most :attr:`QueryIndex.MAX_SPACES` spaces are
    kept).  Encoded queries are
    kept in an LRU cache of ``query_cache_size`` entries.  A query is
    truncated at the space's ``max_text_len`` tokens, like an item text.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from trainer.catalog import CatalogEntry
from trainer.model_config import ModelConfig

if TYPE_CHECKING:
    from serving.snapshot import ServingModel
    from trainer.model import RecModel

log = logging.getLogger(__name__)


def item_document(text: str, categories: Sequence[str]) -> str:
    """What a query is matched against: ``"cat1, cat2: text"`` (the text alone without categories)."""
    return f"{', '.join(categories)}: {text}" if categories else text


def text_only(text: str, categories: Sequence[str]) -> str:  # noqa: ARG001 - same signature as item_document
    """The item text alone (the benchmark's ``text only`` ablation)."""
    return text


# --------------------------------------------------------------------------- the text space
def space_signature(config: ModelConfig, *, pretrained: bool, tag: str = "") -> str:
    """What decides the pooled vectors: the encoder and its settings, and whose weights (``tag``)."""
    base = f"{config.encoder or 'default'}|layers={config.encoder_layers}|len={config.max_text_len}|pool={config.pooling}"
    return f"pretrained|{base}" if pretrained else f"{tag}|{base}"


class TextSpace:
    """Texts -> pooled encoder vectors, as an item tower pools them before its projection.

    It keeps its own tokenizer (a copy): a fast tokenizer shared with the
    loader thread's item tower could be reconfigured by that thread mid-call.
    """

    def __init__(self, signature: str, encoder: torch.nn.Module, tokenizer, *,  # noqa: ANN001 - a tokenizer
                 max_len: int, pooling: str, batch: int) -> None:
        self.signature = signature
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.pooling = pooling
        self.batch = max(1, batch)
        self.hidden = int(encoder.config.hidden_size)

    def _device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Pooled vectors ``[n, hidden]`` (float32) of ``texts``, in their order (shortest encoded together)."""
        n = len(texts)
        out = np.zeros((n, self.hidden), dtype=np.float32)
        if n == 0:
            return out
        ids = self.tokenizer(list(texts), truncation=True, max_length=self.max_len, padding=False)["input_ids"]
        order = sorted(range(n), key=lambda i: len(ids[i]))
        pad = self.tokenizer.pad_token_id or 0
        dev = self._device()
        with torch.inference_mode():
            for start in range(0, n, self.batch):
                chunk = order[start : start + self.batch]
                width = max(len(ids[i]) for i in chunk)
                tok = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for r, i in enumerate(chunk):
                    tok[r, : len(ids[i])] = torch.tensor(ids[i], dtype=torch.long)
                    mask[r, : len(ids[i])] = 1
                tok, mask = tok.to(dev), mask.to(dev)
                hidden = self.encoder(
                    input_ids=tok, attention_mask=mask, token_type_ids=torch.zeros_like(tok)
                ).last_hidden_state
                if self.pooling == "cls":
                    pooled = hidden[:, 0]
                else:
                    m = mask.unsqueeze(-1).to(hidden.dtype)
                    pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
                out[chunk] = pooled.float().cpu().numpy()
        return out


def _tokenizer_copy(tokenizer):  # noqa: ANN001, ANN202
    import copy

    return copy.deepcopy(tokenizer)


def version_space(model: RecModel, tag: str) -> TextSpace:
    """The text space of a version: its item tower's encoder, truncation and pooling."""
    tower, config = model.item_tower, model.config
    pretrained = tower.frozen == tower.n_layers and config.lora_rank == 0
    return TextSpace(
        space_signature(config, pretrained=pretrained, tag=tag), tower.encoder, _tokenizer_copy(tower.tokenizer),
        max_len=config.max_text_len, pooling=config.pooling, batch=config.encode_chunk,
    )  # fmt: skip


def pretrained_space(config: ModelConfig, device: str | torch.device,
                     build: Callable[[ModelConfig], RecModel] | None = None) -> TextSpace:
    """The pretrained encoder as a fresh model of ``config`` has it (offline; only its item tower is kept)."""
    if build is None:
        from trainer.model import build_model as build
    tower = build(config).item_tower.to(device).eval()
    return TextSpace(
        space_signature(config, pretrained=True), tower.encoder, tower.tokenizer,
        max_len=config.max_text_len, pooling=config.pooling, batch=config.encode_chunk,
    )  # fmt: skip


# --------------------------------------------------------------------------- scores
def zscore(x: np.ndarray) -> np.ndarray:
    """``(x - mean) / std`` (float64); all zeros when ``x`` is constant (or has one entry)."""
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return x
    sd = float(x.std())
    if not np.isfinite(sd) or sd <= 1e-12:
        return np.zeros_like(x)
    return (x - x.mean()) / sd


def blend(relevance: np.ndarray, model_scores: np.ndarray, weight: float) -> np.ndarray:
    """``(1 - weight) * z(relevance) + weight * z(model_scores)`` over the same candidates."""
    return (1.0 - weight) * zscore(relevance) + weight * zscore(model_scores)


@dataclass(frozen=True, eq=False)
class _Matrix:
    """The centred unit document vectors of one snapshot's items, under one text space."""

    sm: ServingModel
    signature: str
    generation: int
    unit: np.ndarray  # [n, hidden] float32; zero rows for missing items
    mean: np.ndarray  # [hidden]
    missing: np.ndarray  # [n] bool: no catalog entry (and no vector) for the row


@dataclass(frozen=True, eq=False)
class QueryScores:
    """Relevance of every prepared query against one snapshot (see :meth:`QueryIndex.prepare`)."""

    matrix: _Matrix
    queries: dict[str, np.ndarray]  # query -> centred unit vector

    def scores(self, query: str, rows: np.ndarray | None = None) -> np.ndarray:
        """Cosine (float64) of ``query`` with each item (``rows`` of the snapshot, or all)."""
        m = self.matrix
        unit = m.unit if rows is None else m.unit[rows]
        s = (unit @ self.queries[query]).astype(np.float64)
        missing = m.missing if rows is None else m.missing[rows]
        if missing.any():
            s[missing] = -1.0
        return s


class QueryIndex:
    """Encoded queries and item documents, per text space (see the module doc).  One thread (the scorer).

    ``lookup(item_ids)`` returns the current catalog entry of each item (None
    when unknown) and ``generation()`` changes whenever the catalog does
    (:class:`serving.state.CatalogState`).  ``pretrained`` is the config whose
    encoder answers before any version (default ``ModelConfig()``), built by
    ``build`` (default :func:`trainer.model.build_model`) at most once.
    """

    MAX_SPACES = 2
    """Text spaces whose document vectors are kept (the live one and the one before)."""

    def __init__(
        self,
        lookup: Callable[[Sequence[str]], Sequence[CatalogEntry | None]],
        *,
        generation: Callable[[], int] = lambda: 0,
        cache_size: int = 10_000,
        pretrained: ModelConfig | None = None,
        device: str | torch.device = "cpu",
        document: Callable[[str, Sequence[str]], str] = item_document,
        build: Callable[[ModelConfig], RecModel] | None = None,
    ) -> None:
        if cache_size < 1:
            raise ValueError("cache_size must be >= 1")
        self._lookup = lookup
        self._generation = generation
        self.cache_size = cache_size
        self.pretrained_config = pretrained or ModelConfig()
        self.device = device
        self.document = document
        self._build = build
        self._pretrained: TextSpace | None = None
        self._version: tuple[RecModel, TextSpace] | None = None
        self._docs: OrderedDict[str, dict[str, tuple[CatalogEntry, np.ndarray]]] = OrderedDict()
        self._queries: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._matrix: _Matrix | None = None
        self.pretrained_loads = 0
        self.documents_encoded = 0
        self.queries_encoded = 0

    # --- spaces ---------------------------------------------------------------------------------
    def space(self, sm: ServingModel) -> TextSpace:
        """The text space of a snapshot: its version's encoder, or the pretrained one (built once)."""
        if sm.model is None:
            if self._pretrained is None:
                log.info("query without a version: loading the pretrained encoder (once)")
                self._pretrained = pretrained_space(self.pretrained_config, self.device, self._build)
                self.pretrained_loads += 1
            return self._pretrained
        if self._version is None or self._version[0] is not sm.model:
            self._version = (sm.model, version_space(sm.model, f"version {sm.version}@{id(sm.model):x}"))
        return self._version[1]

    # --- documents ------------------------------------------------------------------------------
    def _store(self, signature: str) -> dict[str, tuple[CatalogEntry, np.ndarray]]:
        store = self._docs.get(signature)
        if store is None:
            store = self._docs[signature] = {}
            while len(self._docs) > self.MAX_SPACES:
                self._docs.popitem(last=False)
        self._docs.move_to_end(signature)
        return store

    def matrix(self, sm: ServingModel, space: TextSpace) -> _Matrix:
        """The snapshot's document vectors under ``space`` (cached until the snapshot or catalog changes)."""
        gen = self._generation()
        m = self._matrix
        if m is not None and m.sm is sm and m.signature == space.signature and m.generation == gen:
            return m
        store = self._store(space.signature)
        ids = sm.item_ids
        entries = self._lookup(ids)
        n = len(ids)
        vecs = np.zeros((n, space.hidden), dtype=np.float32)
        missing = np.zeros(n, dtype=bool)
        todo: list[tuple[int, str, CatalogEntry]] = []
        for r, (item_id, e) in enumerate(zip(ids, entries, strict=True)):
            cached = store.get(item_id)
            if e is None:  # removed from the catalog, not yet from the snapshot
                if cached is None:
                    missing[r] = True
                else:
                    vecs[r] = cached[1]
                continue
            if cached is not None and (cached[0] is e or (cached[0].text == e.text and cached[0].categories == e.categories)):
                vecs[r] = cached[1]
            else:
                todo.append((r, item_id, e))
        if todo:
            encoded = space.encode([self.document(e.text, e.categories) for _, _, e in todo])
            for (r, item_id, e), v in zip(todo, encoded, strict=True):
                store[item_id] = (e, v)
                vecs[r] = v
            self.documents_encoded += len(todo)
            log.info("query index: %d item document(s) encoded (%s)", len(todo), space.signature)
        if len(store) > n:  # forget items that left the catalog
            for item_id in [i for i in store if i not in sm.index]:
                del store[item_id]
        present = ~missing
        mean = vecs[present].mean(0) if present.any() else np.zeros(space.hidden, dtype=np.float32)
        unit = vecs - mean
        unit /= np.maximum(np.linalg.norm(unit, axis=1, keepdims=True), 1e-12)
        unit[missing] = 0.0
        self._matrix = m = _Matrix(sm, space.signature, gen, unit.astype(np.float32), mean, missing)
        return m

    # --- queries ----------------------------------------------------------------------------------
    def _query_vectors(self, space: TextSpace, queries: Sequence[str]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        todo: list[str] = []
        for q in dict.fromkeys(queries):
            key = (space.signature, q)
            v = self._queries.get(key)
            if v is None:
                todo.append(q)
            else:
                self._queries.move_to_end(key)
                out[q] = v
        if todo:
            for q, v in zip(todo, space.encode(todo), strict=True):
                self._queries[(space.signature, q)] = out[q] = v
            self.queries_encoded += len(todo)
            while len(self._queries) > self.cache_size:
                self._queries.popitem(last=False)
        return out

    def prepare(self, sm: ServingModel, queries: Sequence[str]) -> QueryScores:
        """Everything needed to score ``queries`` against ``sm``'s items (encodes what is not cached)."""
        space = self.space(sm)
        m = self.matrix(sm, space)
        vecs = self._query_vectors(space, queries)
        unit = {}
        for q, v in vecs.items():
            c = v - m.mean
            unit[q] = (c / max(float(np.linalg.norm(c)), 1e-12)).astype(np.float32)
        return QueryScores(m, unit)

    @property
    def cached_queries(self) -> int:
        """Encoded queries in the cache."""
        return len(self._queries)
