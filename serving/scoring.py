"""What the scoring agent computes, without Kafka: top-k, the fallback, cold start, exploration.

Ranking
    :func:`top_k` orders by score, highest first.  **Ties go by a hash of
    the request_id and the item_id**: the same request gets the same
    answer in every agent and every run (a redelivered request is answered
    the same), while requests differ in how they break ties, so the items
    nobody has clicked yet (all tied at popularity 0) are spread over the
    users instead of every user being shown the smallest item_ids (the
    closed loop's fallback phase did that).  Without a salt, ties go to
    the smaller item_id.  NaN scores rank last.  ``k`` larger than the
    candidate list returns them all.

Fallback (no model yet, or none of a request's candidates is known)
    :class:`Popularity`: each click (an item newly appended to a user's
    history, see :func:`appended_items`) adds weight ``2 ** (ts / half_life)``
    to its item, i.e. a click count with exponential decay in **event time**.
    All items decay by the same factor, so the ranking needs no "now".  The
    fallback score is that weight scaled to [0, 1] by the most popular item;
    ``model_version`` is ``"fallback:popularity"``.

Cold start (a user with no known history, when a model is live)
    ``score = (1 - blend) * popularity + blend * similarity``, where
    *popularity* is the fallback score above and *similarity* is
    ``(1 + cos(item, c)) / 2`` with ``c`` the popularity-weighted mean of the
    (normalised) item vectors of the ``trending_items`` most popular items.
    Both terms lie in [0, 1]; ``blend`` is ``cold_start_blend`` (default 0.5).
    A brand-new item has no clicks, but its text vector can be close to what
    is trending, so it is recommended by text alone.  Before any click at
    all there is nothing trending, and the model scores the user with its
    learned "no history" user vector.

Free-text queries (a request with ``query``; :mod:`serving.query`)
    Ranked by the query's cosine with each candidate's text and categories
    (path ``query``: a new user, or no version yet, when ``model_version`` is
    ``"fallback:query"``), or, for a user with a known history while a
    version is live, by ``(1 - w) * z(cosine) + w * z(model score)`` (path
    ``query_model``; ``w`` = ``query_weight``).  A query request none of whose
    candidates is known is ranked over the whole catalog.  Without a
    :class:`~serving.query.QueryIndex`, or for ``QUERY_RETRY_S`` after encoding
    failed (logged), the query is ignored and the request takes the paths above.

Exploration (off by default)
    Among the top ``max(k, explore_pool)`` candidates, positions are filled
    one at a time: *epsilon*-greedy takes the best remaining item with
    probability ``1 - epsilon`` and a uniformly drawn remaining item
    otherwise; *softmax* draws from ``softmax(score / temperature)`` over the
    remaining items (Plackett-Luce).  Each shown item's ``propensity`` is the
    probability that it was chosen **at its position given the items above
    it**; the product over the slate is the slate's probability, and at every
    position the probabilities of all remaining items sum to 1 — what
    off-policy estimators (IPS, SNIPS) need.  The RNG is seeded from
    ``explore_seed`` and the request_id, so a request is explored the same
    way when redelivered.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from contract.records import RecRequest, ScoredItem
from serving.query import QueryIndex, QueryScores, blend
from serving.settings import QUERY_FALLBACK_VERSION
from serving.snapshot import ServingModel
from trainer.popularity import Popularity

log = logging.getLogger(__name__)

Path = Literal["model", "cold", "fallback", "query", "query_model"]
QUERY_RETRY_S = 60.0
"""After queries failed to encode (an encoder that cannot load), they are ignored this long before a retry."""
_FULL_SCORING_CELLS = 4_000_000
"""Score a batch against the whole catalog when batch x catalog is at most this (16 MB of float32)."""


# --------------------------------------------------------------------------- ranking
def tie_key(salt: str, item_id: str) -> bytes | str:
    """How :func:`top_k` orders items of equal score: by a hash of ``salt`` and the item, or, with no
    salt, by the item_id itself."""
    if not salt:
        return item_id
    return hashlib.blake2b(f"{salt}\x1f{item_id}".encode(), digest_size=8).digest()


def top_k(scores: np.ndarray, item_ids: Sequence[str], k: int, salt: str = "") -> list[int]:
    """Positions of the ``k`` best scores, best first; ties by :func:`tie_key` (``salt``: the
    request_id; none: the smaller item_id); NaN last."""
    n = len(scores)
    if len(item_ids) != n:
        raise ValueError(f"{n} scores but {len(item_ids)} item ids")
    if k <= 0 or n == 0:
        return []
    s = np.asarray(scores, dtype=np.float64)
    if np.isnan(s).any():
        s = np.where(np.isnan(s), -np.inf, s)
    if k < n:
        # Everything scoring at least the k-th best score, ties at the boundary included.
        kth = np.partition(s, n - k)[n - k]
        pool = np.flatnonzero(s >= kth)
    else:
        pool = np.arange(n)
    positions, values = pool.tolist(), s[pool].tolist()
    order = sorted(range(len(positions)), key=lambda j: (-values[j], tie_key(salt, item_ids[positions[j]])))
    return [positions[j] for j in order[:k]]


class _RowIds:
    """The item_ids of some rows of a snapshot, as a sequence (no copy)."""

    __slots__ = ("ids", "rows")

    def __init__(self, ids: Sequence[str], rows: np.ndarray) -> None:
        self.ids, self.rows = ids, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> str:
        return self.ids[self.rows[i]]


# --------------------------------------------------------------------------- popularity
def appended_items(old: Sequence[str], new: Sequence[str], limit: int) -> list[str]:
    """Items newly appended to a history (most recent last) going from ``old`` to ``new``.

    The new history is the old one, trimmed at the front, plus the new items:
    the answer is what follows the longest suffix of ``old`` that is a prefix
    of ``new``.  Only the last ``limit`` items of each are compared (so at most
    ``limit`` items count per update).  A user's first history counts all its
    items, which is how popularity is rebuilt from the compacted topic at
    start-up.  A repeated click on the item already last in a full history
    is ambiguous and not counted.
    """
    o, n = list(old[-limit:]), list(new[-limit:])
    for overlap in range(min(len(o), len(n)), 0, -1):
        if o[len(o) - overlap :] == n[:overlap]:
            return n[overlap:]
    return n


def cold_start_scores(
    popularity: np.ndarray, item_vecs: np.ndarray | None, *, trending: int, blend: float
) -> np.ndarray | None:
    """Scores of every item for a user without history (see the module doc); None if nothing trends.

    ``popularity`` is :meth:`Popularity.vector` over the rows of ``item_vecs``.
    Without item vectors (no model) the answer is the popularity itself.
    """
    if not (popularity > 0).any():
        return None
    if item_vecs is None or blend == 0.0:
        return popularity.copy()
    norms = np.linalg.norm(item_vecs, axis=1, keepdims=True)
    unit = item_vecs / np.maximum(norms, 1e-12)
    n_top = min(trending, int((popularity > 0).sum()))
    top = np.argsort(-popularity, kind="stable")[:n_top]
    centroid = (popularity[top, None] * unit[top]).sum(0)
    c_norm = np.linalg.norm(centroid)
    if c_norm <= 1e-12:
        return popularity.copy()
    similarity = (1.0 + unit @ (centroid / c_norm)) / 2.0
    return (1.0 - blend) * popularity + blend * similarity


# --------------------------------------------------------------------------- exploration
@dataclass(frozen=True)
class ExplorePolicy:
    kind: Literal["off", "epsilon", "softmax"] = "off"
    epsilon: float = 0.1
    temperature: float = 1.0
    pool: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("off", "epsilon", "softmax"):
            raise ValueError(f"unknown exploration {self.kind!r}")
        if not 0.0 <= self.epsilon <= 1.0:
            raise ValueError("epsilon must lie in [0, 1]")
        if not self.temperature > 0:
            raise ValueError("temperature must be > 0")
        if self.pool < 1:
            raise ValueError("pool must be >= 1")

    @property
    def on(self) -> bool:
        return self.kind != "off"

    def rng(self, request_id: str) -> np.random.Generator:
        digest = hashlib.blake2b(f"{self.seed}\x00{request_id}".encode(), digest_size=8).digest()
        return np.random.default_rng(int.from_bytes(digest, "little"))


def explore(
    ranked_scores: Sequence[float], k: int, policy: ExplorePolicy, rng: np.random.Generator
) -> tuple[list[int], list[float]]:
    """Choose ``k`` of a pool ranked best first; return (positions in the pool, propensities).

    The propensity of a choice is its probability at its position given the
    choices above it (see the module doc).
    """
    m = len(ranked_scores)
    k = min(k, m)
    if policy.kind == "off":
        return list(range(k)), [1.0] * k
    remaining = list(range(m))
    chosen: list[int] = []
    props: list[float] = []
    if policy.kind == "epsilon":
        eps = policy.epsilon
        for _ in range(k):
            r = len(remaining)
            j = int(rng.integers(r)) if rng.random() < eps else 0
            props.append(((1.0 - eps) if j == 0 else 0.0) + eps / r)
            chosen.append(remaining.pop(j))
    else:
        logits = np.asarray(ranked_scores, dtype=np.float64) / policy.temperature
        logits = np.where(np.isnan(logits), -np.inf, logits)
        for _ in range(k):
            p = softmax_probs(logits[remaining])
            j = int(rng.choice(len(remaining), p=p))
            props.append(float(min(1.0, p[j])))
            chosen.append(remaining.pop(j))
    return chosen, props


def softmax_probs(logits: np.ndarray) -> np.ndarray:
    """softmax that survives -inf (all -inf: uniform) and sums to 1."""
    finite = np.isfinite(logits)
    if not finite.any():
        return np.full(len(logits), 1.0 / len(logits))
    z = np.where(finite, logits - logits[finite].max(), -np.inf)
    e = np.exp(z)
    return e / e.sum()


# --------------------------------------------------------------------------- batch scoring
@dataclass(frozen=True, slots=True)
class Query:
    """One request and the requesting user's history (most recent last)."""

    request: RecRequest
    history: Sequence[str]


@dataclass(frozen=True, slots=True)
class Scored:
    """The answer to one query."""

    request: RecRequest
    items: list[ScoredItem]
    model_version: str
    path: Path
    unknown_candidates: int


@dataclass
class _Plan:
    query: Query
    candidates: np.ndarray | None  # rows of the serving model, None = the whole catalog
    unknown: int
    path: Path
    use_model: bool  # scored by the user tower (else: popularity, the cold-start blend or the query alone)
    row: int = -1  # row in the user-tower batch
    text: str | None = None  # the request's query, when it is scored by it


class Scorer:
    """Scores micro-batches against an immutable :class:`~serving.snapshot.ServingModel`.

    Holds only caches (the popularity and cold-start vectors of the current
    snapshot, refreshed at most every ``refresh_s`` while clicks arrive, and at
    once for a new snapshot); no I/O.  Call from one thread.
    """

    def __init__(
        self,
        popularity: Popularity,
        *,
        fallback_version: str,
        history_length: int = 50,
        trending: int = 20,
        blend: float = 0.5,
        policy: ExplorePolicy | None = None,
        refresh_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        query: QueryIndex | None = None,
        query_weight: float = 0.5,
        query_version: str = QUERY_FALLBACK_VERSION,
    ) -> None:
        if not 0.0 <= query_weight <= 1.0:
            raise ValueError("query_weight must lie in [0, 1]")
        self.popularity = popularity
        self.query = query
        self.query_weight = query_weight
        self.query_version = query_version
        self._query_failed_at = -math.inf
        self.fallback_version = fallback_version
        self.history_length = history_length
        self.trending = trending
        self.blend = blend
        self.policy = policy or ExplorePolicy()
        self.refresh_s = refresh_s
        self._clock = clock
        self._cache_sm: ServingModel | None = None
        self._cache_gen = -1
        self._cache_at = -math.inf
        self._pop: np.ndarray = np.zeros(0)
        self._cold: np.ndarray | None = None

    def _vectors(self, sm: ServingModel) -> tuple[np.ndarray, np.ndarray | None]:
        now, gen = self._clock(), self.popularity.generation
        stale = gen != self._cache_gen and now - self._cache_at >= self.refresh_s
        if self._cache_sm is not sm or stale:
            self._pop = self.popularity.vector(sm.item_ids)
            vecs = sm.item_vecs.float().cpu().numpy() if sm.item_vecs is not None else None
            self._cold = cold_start_scores(self._pop, vecs, trending=self.trending, blend=self.blend)
            self._cache_sm, self._cache_gen, self._cache_at = sm, gen, now
        return self._pop, self._cold

    def score(self, sm: ServingModel, queries: Sequence[Query]) -> list[Scored]:
        """Answer every query with the same model snapshot ``sm`` (see the module doc for the paths)."""
        pop, cold = self._vectors(sm)
        has_model = sm.model is not None and sm.item_vecs is not None
        index = sm.index
        texts = self._prepare_queries(sm, queries)
        plans: list[_Plan] = []
        for q in queries:
            rows: np.ndarray | None = None
            unknown = 0
            text = q.request.query.strip() if texts is not None and q.request.query else None
            if q.request.candidates is not None:
                found = list(map(index.get, q.request.candidates))
                known = [r for r in found if r is not None]
                unknown = len(found) - len(known)
                if not known:  # nothing scorable: the query (or popularity) over the whole catalog
                    path: Path = "fallback" if text is None else "query"
                    plans.append(_Plan(q, None, unknown, path, use_model=False, text=text))
                    continue
                rows = np.asarray(known, dtype=np.int64)
            if text is not None:
                with_model = has_model and any(h in index for h in q.history)
                path = "query_model" if with_model else "query"
                plans.append(_Plan(q, rows, unknown, path, use_model=with_model, text=text))
            elif not has_model:
                plans.append(_Plan(q, rows, unknown, "fallback", use_model=False))
            elif any(h in index for h in q.history):
                plans.append(_Plan(q, rows, unknown, "model", use_model=True))
            else:  # a new user: the blend, or the model's "no history" vector before any click
                plans.append(_Plan(q, rows, unknown, "cold", use_model=cold is None))

        by_model = [p for p in plans if p.use_model]
        model_scores = self._model_scores(sm, by_model) if by_model else {}

        out: list[Scored] = []
        for p in plans:
            if p.text is not None:
                assert texts is not None
                relevance = texts.scores(p.text, p.candidates)
                scores = blend(relevance, model_scores[id(p)], self.query_weight) if p.use_model else relevance
            elif p.use_model:
                scores = model_scores[id(p)]
            else:
                base = pop if p.path == "fallback" else cold
                assert base is not None
                scores = base if p.candidates is None else base[p.candidates]
            ids = sm.item_ids if p.candidates is None else _RowIds(sm.item_ids, p.candidates)
            if p.path == "fallback":
                version = self.fallback_version
            elif not has_model:  # a query answered by the pretrained encoder alone
                version = self.query_version
            else:
                version = sm.version
            items = self._pick(scores, ids, p.query.request)
            out.append(Scored(p.query.request, items, version, p.path, p.unknown))
        return out

    def _prepare_queries(self, sm: ServingModel, queries: Sequence[Query]) -> QueryScores | None:
        """Encode the batch's queries (and, once, the catalog's documents); None: none, or ignored."""
        if self.query is None:
            return None
        texts = [q.request.query.strip() for q in queries if q.request.query]
        if not texts or self._clock() - self._query_failed_at < QUERY_RETRY_S:
            return None
        try:
            return self.query.prepare(sm, texts)
        except Exception:  # an encoder that cannot load must not fail the other requests of the batch
            log.exception("cannot encode %d request queries under %s: answering queries without them for %.0f s",
                          len(texts), sm.version, QUERY_RETRY_S)  # fmt: skip
            self._query_failed_at = self._clock()
            return None

    def _model_scores(self, sm: ServingModel, plans: list[_Plan]) -> dict[int, np.ndarray]:
        """Model scores per plan (id(plan) -> scores over its candidates or the catalog)."""
        model, vecs = sm.model, sm.item_vecs
        assert model is not None and vecs is not None
        idx, mask = sm.history_matrix([p.query.history for p in plans], model.config.max_history or self.history_length)
        for r, p in enumerate(plans):
            p.row = r
        out: dict[int, np.ndarray] = {}
        user_ids = [p.query.request.user_id for p in plans]
        with torch.inference_mode():
            dev = vecs.device
            mask_t = torch.from_numpy(mask).to(dev)
            valid = idx[mask]
            if valid.size and hasattr(model, "encode_users_indexed"):
                # The user tower projects each distinct history item of the batch once.
                uniq, inverse = np.unique(valid, return_inverse=True)
                local = np.zeros_like(idx)
                local[mask] = inverse
                users = model.encode_users_indexed(
                    vecs[torch.from_numpy(uniq).to(dev)], torch.from_numpy(local).to(dev), mask_t, user_ids
                )
            else:
                users = model.encode_users(vecs[torch.from_numpy(idx).to(dev)], mask_t, user_ids)
            if len(plans) * len(vecs) <= _FULL_SCORING_CELLS:
                # One product against the whole catalog; candidates are columns of it.
                s = model.score_matrix(users, vecs).float().cpu().numpy()
                for p in plans:
                    out[id(p)] = s[p.row] if p.candidates is None else s[p.row, p.candidates]
                return out
            full = [p for p in plans if p.candidates is None]
            if full:
                rows = torch.tensor([p.row for p in full], device=dev)
                s = model.score_matrix(users[rows], vecs).float().cpu().numpy()
                for i, p in enumerate(full):
                    out[id(p)] = s[i]
            part = [p for p in plans if p.candidates is not None]
            if part:  # a large catalog: score only the union of the candidates
                union = np.unique(np.concatenate([p.candidates for p in part]))
                rows = torch.tensor([p.row for p in part], device=dev)
                cols = torch.from_numpy(union).to(dev)
                s = model.score_matrix(users[rows], vecs[cols]).float().cpu().numpy()
                for i, p in enumerate(part):
                    out[id(p)] = s[i, np.searchsorted(union, p.candidates)]
        return out

    def _pick(self, scores: np.ndarray, ids: Sequence[str], request: RecRequest) -> list[ScoredItem]:
        # model_construct: ids come from the catalog, scores are made finite, propensities lie in (0, 1].
        make = ScoredItem.model_construct
        rows, props = choose(scores, ids, request.k, self.policy, request.request_id)
        values = scores[rows].tolist() if len(rows) else []
        if props is None:
            return [make(item_id=ids[i], score=_finite(v)) for i, v in zip(rows, values, strict=True)]
        return [
            make(item_id=ids[i], score=_finite(v), propensity=min(1.0, max(pr, 1e-300)))
            for i, v, pr in zip(rows, values, props, strict=True)
        ]


def choose(
    scores: np.ndarray, ids: Sequence[str], k: int, policy: ExplorePolicy, request_id: str
) -> tuple[list[int], list[float] | None]:
    """What serving shows for a request: positions in ``ids``, in slate order, and their propensities
    (None without exploration).  Greedy: :func:`top_k` (ties by the request id).  Exploring:
    :func:`explore` over the top ``max(k, policy.pool)``, drawn from the request id."""
    if not policy.on:
        return top_k(scores, ids, k, request_id), None
    ranked = top_k(scores, ids, max(k, policy.pool), request_id)
    chosen, props = explore([float(scores[i]) for i in ranked], k, policy, policy.rng(request_id))
    return [ranked[c] for c in chosen], props


def _finite(x: float) -> float:
    """JSON has no NaN/inf: NaN -> the lowest float, inf clipped.

    A clamp, not a test: ``trainer.metrics.finite`` (is it a finite number?) does not replace it.
    """
    if math.isfinite(x):
        return x
    return -1.7976931348623157e308 if math.isnan(x) or x < 0 else 1.7976931348623157e308
