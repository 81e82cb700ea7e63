"""A seeded synthetic stream with a known click model, new items and a concept drift.

The world
---------
* ``topics`` latent topics, each with a vocabulary of ``words_per_topic``
  English words (built-in themes such as *cooking* or *astronomy*; past the
  built-in ones, generated pseudo-words).
* Item ``i`` has a topic mixture ``phi_i ~ Dirichlet(item_concentration)``;
  its text is ``words_per_item`` words, each drawn by picking a topic from
  ``phi_i`` and then a word of that topic's vocabulary uniformly, so a text
  encoder can recover ``phi_i`` from the text.  ``categories`` = the name of
  the dominant topic ``argmax phi_i``.
* User ``u`` has interests ``theta_u ~ Dirichlet(user_concentration)``.
* Ground truth: the probability that ``u`` clicks ``i`` when shown it is::

      p(u, i, t) = sigmoid(sharpness * <theta_u(t), phi_i> + bias)

  with ``<.,.>`` the dot product (in [0, 1]).  It does not depend on the slate
  position or on the other items of the slate.  A click is sampled for every
  shown item independently: ``label ~ Bernoulli(p)``.
* Concept drift: at event time :attr:`SyntheticStream.shift_ts` (the time of
  impression number ``floor(shift_at * events)``), a random ``shift_fraction``
  of the users re-draw their interests from the same Dirichlet;
  ``theta_u(t)`` is the new vector for ``t >= shift_ts``.
* ``new_items`` items arrive during the stream at uniformly random event
  times; each one's ``Item`` record is emitted at its arrival time, before any
  impression can show it.  Slates are ``slate_size`` distinct items drawn
  uniformly from the items that have arrived; users are drawn uniformly;
  impressions arrive with exponential gaps of mean ``mean_gap_ms``; a click
  follows its impression after a uniform delay in ``click_delay_ms``.

The truth is exposed three ways: :meth:`SyntheticStream.true_probability`,
:meth:`SyntheticStream.truth` (one row per shown item, with the sampled label),
and each impression's ``context = {"synthetic": true, "p_click": [...]}``
(per slate position).  The context is the answer key: a model must never use it
as a feature.  :meth:`SyntheticStream.best_auc` is the AUC that the truth itself
reaches on the sampled labels, the ceiling for any model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np

from contract.errors import ConfigError
from contract.records import Click, Impression, Item
from contract.topics import CLICKS, IMPRESSIONS, ITEMS
from streams.replay import ReplayEvent, event_order

_KIND_ITEM, _KIND_IMPRESSION, _KIND_CLICK = 0, 1, 2

# fmt: off
THEMES: dict[str, tuple[str, ...]] = {
    "cooking": ("recipe", "oven", "garlic", "simmer", "pasta", "spice", "bake", "butter", "sauce",
                "kitchen", "onion", "roast", "flour", "pepper", "soup", "grill", "dough", "herb",
                "broth", "skillet", "basil", "vinegar", "dessert", "chef"),
    "astronomy": ("galaxy", "telescope", "orbit", "planet", "comet", "nebula", "asteroid", "lunar",
                  "eclipse", "star", "cosmos", "rocket", "satellite", "meteor", "astronaut", "solar",
                  "quasar", "gravity", "jupiter", "saturn", "crater", "supernova", "observatory", "mars"),
    "football": ("goal", "striker", "referee", "penalty", "stadium", "midfield", "league", "keeper",
                 "tackle", "corner", "offside", "match", "coach", "season", "derby", "header",
                 "transfer", "pitch", "fans", "trophy", "defender", "kickoff", "dribble", "volley"),
    "music": ("guitar", "melody", "chord", "drummer", "album", "concert", "violin", "rhythm",
              "singer", "piano", "lyrics", "orchestra", "tempo", "bass", "jazz", "symphony", "tune",
              "band", "harmony", "chorus", "vinyl", "opera", "saxophone", "ballad"),
    "finance": ("stock", "bond", "dividend", "inflation", "portfolio", "interest", "mortgage",
                "equity", "market", "budget", "pension", "broker", "currency", "loan", "tax",
                "investor", "bank", "credit", "yield", "savings", "hedge", "asset", "revenue", "debt"),
    "gardening": ("soil", "compost", "tulip", "seedling", "prune", "greenhouse", "shovel", "mulch",
                  "orchid", "lawn", "hedgerow", "fertilizer", "blossom", "bulb", "watering", "weed",
                  "rose", "vegetable", "harvest", "trellis", "fern", "perennial", "rake", "sprout"),
    "medicine": ("doctor", "vaccine", "surgery", "patient", "diagnosis", "clinic", "nurse", "virus",
                 "therapy", "fever", "antibiotic", "hospital", "symptom", "cardiology", "dose",
                 "immune", "infection", "prescription", "x-ray", "allergy", "pharmacy", "wound",
                 "recovery", "pulse"),
    "sailing": ("boat", "harbor", "anchor", "sail", "mast", "tide", "captain", "voyage", "deck",
                "keel", "yacht", "compass", "wave", "crew", "rudder", "island", "navigation",
                "regatta", "knot", "hull", "breeze", "lighthouse", "port", "ocean"),
    "computing": ("software", "compiler", "database", "server", "python", "algorithm", "laptop",
                  "network", "keyboard", "kernel", "cloud", "debugging", "processor", "browser",
                  "encryption", "memory", "linux", "code", "router", "pixel", "backup", "cache",
                  "firmware", "terminal"),
    "history": ("empire", "castle", "medieval", "pharaoh", "revolution", "dynasty", "archive",
                "knight", "treaty", "ancient", "monarch", "battle", "ruins", "chronicle", "colony",
                "renaissance", "senate", "legion", "manuscript", "crusade", "viking", "emperor",
                "artifact", "fortress"),
    "fashion": ("dress", "runway", "designer", "fabric", "silk", "jacket", "boutique", "denim",
                "couture", "handbag", "sneakers", "tailor", "scarf", "collection", "model", "velvet",
                "stitch", "wardrobe", "heels", "linen", "pattern", "accessory", "cotton", "vogue"),
    "wildlife": ("wolf", "elephant", "safari", "eagle", "habitat", "predator", "tiger", "migration",
                 "zebra", "owl", "rainforest", "species", "giraffe", "bear", "savanna", "dolphin",
                 "nest", "herd", "leopard", "fox", "reptile", "falcon", "burrow", "gorilla"),
}
_SYLLABLES = ("ka", "lo", "mi", "ru", "ten", "vax", "sor", "bel", "dun", "pri", "zo", "qua", "nel",
              "tor", "fi", "gam")
# fmt: on


@dataclass(frozen=True)
class SyntheticConfig:
    """Every knob of the synthetic world (see the module docstring for the model).

    users: number of users.
    items: items in the catalog at the start of the stream.
    new_items: items that arrive during the stream.
    events: number of impressions.
    topics: number of latent topics.
    slate_size: items per impression (at most ``items``).
    words_per_topic: vocabulary size of each topic.
    words_per_item: words in each item's text.
    user_concentration: Dirichlet parameter of user interests (small = focused users).
    item_concentration: Dirichlet parameter of item topic mixtures (small = single-topic items).
    sharpness: ``a`` of ``sigmoid(a * <theta, phi> + b)``.
    bias: ``b`` of the same formula (sets the base click rate).
    shift_at: fraction of the impressions after which interests shift; None = no drift.
    shift_fraction: fraction of users whose interests are re-drawn at the shift.
    start_ts_ms: event time (epoch ms) of the initial catalog and the stream start.
    mean_gap_ms: mean event-time gap between consecutive impressions (exponential).
    click_delay_ms: (min, max) event-time delay from impression to click, uniform.
    seed: seeds everything; the same config gives the same stream, record for record.
    """

    users: int = 200
    items: int = 300
    new_items: int = 100
    events: int = 5_000
    topics: int = 8
    slate_size: int = 10
    words_per_topic: int = 24
    words_per_item: int = 12
    user_concentration: float = 0.3
    item_concentration: float = 0.1
    sharpness: float = 8.0
    bias: float = -4.0
    shift_at: float | None = 0.5
    shift_fraction: float = 0.5
    start_ts_ms: int = 1_700_000_000_000
    mean_gap_ms: float = 1_000.0
    click_delay_ms: tuple[int, int] = (500, 10_000)
    seed: int = 0

    def __post_init__(self) -> None:
        def need(ok: bool, setting: str, reason: str) -> None:
            if not ok:
                raise ConfigError(setting, f"{reason}, got {getattr(self, setting)!r}")

        for name in ("users", "items", "topics", "words_per_topic", "words_per_item"):
            need(getattr(self, name) >= 1, name, "must be >= 1")
        need(self.new_items >= 0, "new_items", "must be >= 0")
        need(self.events >= 0, "events", "must be >= 0")
        need(
            1 <= self.slate_size <= self.items, "slate_size", f"must be in 1..items ({self.items})"
        )
        need(self.user_concentration > 0, "user_concentration", "must be > 0")
        need(self.item_concentration > 0, "item_concentration", "must be > 0")
        need(
            math.isfinite(self.sharpness) and math.isfinite(self.bias),
            "sharpness",
            "must be finite",
        )
        need(
            self.shift_at is None or 0.0 <= self.shift_at <= 1.0,
            "shift_at",
            "must be in [0, 1] or None",
        )
        need(0.0 <= self.shift_fraction <= 1.0, "shift_fraction", "must be in [0, 1]")
        need(self.start_ts_ms >= 0, "start_ts_ms", "must be >= 0")
        need(self.mean_gap_ms >= 0, "mean_gap_ms", "must be >= 0")
        lo, hi = self.click_delay_ms
        need(0 <= lo <= hi, "click_delay_ms", "must be (min, max) with 0 <= min <= max")
        need(self.seed >= 0, "seed", "must be >= 0")


class TruthRow(NamedTuple):
    """One shown item of one impression, with its true click probability and sampled label."""

    impression_id: str
    user_id: str
    item_id: str
    position: int
    ts: int
    p_click: float
    label: int


class _Example(Protocol):
    @property
    def impression_id(self) -> str: ...
    @property
    def item_id(self) -> str: ...
    @property
    def label(self) -> int: ...


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def auc(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
    """Area under the ROC curve (Mann–Whitney, ties count one half); NaN with one class only."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="stable")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    # average rank within each run of tied scores
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], len(s)]
    avg = (starts + ends + 1) / 2.0  # 1-based average rank of each run
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def best_auc(rows: Iterable[TruthRow]) -> float:
    """AUC of the true probabilities against the sampled labels of ``rows``."""
    rows = list(rows)
    return auc([r.p_click for r in rows], [r.label for r in rows])


def _vocabularies(
    topics: int, words: int, rng: np.random.Generator
) -> tuple[list[str], list[list[str]]]:
    names: list[str] = []
    vocab: list[list[str]] = []
    themes = list(THEMES.items())
    used: set[str] = set()
    for t in range(topics):
        name, base = themes[t] if t < len(themes) else (f"topic{t}", ())
        chosen = [w for w in base if w not in used][:words]
        while len(chosen) < words:  # pseudo-words past the built-in vocabulary
            w = "".join(rng.choice(_SYLLABLES, size=3))
            if w not in used and w not in chosen:
                chosen.append(w)
        used.update(chosen)
        names.append(name)
        vocab.append(chosen)
    return names, vocab


class SyntheticStream:
    """One generated world and its stream; everything is computed at construction.

    >>> world = SyntheticStream(SyntheticConfig(events=1000, seed=1))
    >>> world.counts()["impressions"]
    1000
    >>> 0.5 < world.best_auc() <= 1.0
    True
    """

    def __init__(self, config: SyntheticConfig | None = None) -> None:
        self.config = c = config or SyntheticConfig()
        rng = np.random.default_rng(c.seed)
        self.topic_names, self.vocabulary = _vocabularies(c.topics, c.words_per_topic, rng)
        n_items = c.items + c.new_items

        # items: topic mixtures, text, arrival times
        self.item_topics = rng.dirichlet(np.full(c.topics, c.item_concentration), size=n_items)
        self.item_ids = [f"syn-item-{i:05d}" for i in range(n_items)]
        self.item_texts = []
        for i in range(n_items):
            z = rng.choice(c.topics, size=c.words_per_item, p=self.item_topics[i])
            w = rng.integers(0, c.words_per_topic, size=c.words_per_item)
            self.item_texts.append(
                " ".join(self.vocabulary[t][j] for t, j in zip(z, w, strict=True))
            )
        self.item_categories = [[self.topic_names[int(t)]] for t in self.item_topics.argmax(axis=1)]

        # impressions: times and users
        gaps = rng.exponential(c.mean_gap_ms, size=c.events)
        self.impression_ts = c.start_ts_ms + np.floor(np.cumsum(gaps)).astype(np.int64)
        end_ts = int(self.impression_ts[-1]) if c.events else c.start_ts_ms
        self.item_arrival_ts = np.full(n_items, c.start_ts_ms, dtype=np.int64)
        self.item_arrival_ts[c.items :] = np.sort(
            rng.integers(c.start_ts_ms, end_ts + 1, size=c.new_items)
        )
        self.user_ids = [f"syn-user-{u:05d}" for u in range(c.users)]
        self.impression_user = rng.integers(0, c.users, size=c.events)

        # interests, before and after the drift
        alpha = np.full(c.topics, c.user_concentration)
        self.interests_before = rng.dirichlet(alpha, size=c.users)
        redrawn = rng.dirichlet(alpha, size=c.users)
        self.shifted_users = np.sort(
            rng.choice(c.users, size=round(c.shift_fraction * c.users), replace=False)
        )
        self.interests_after = self.interests_before.copy()
        self.shift_ts: int | None = None
        if c.shift_at is not None and c.events and int(c.shift_at * c.events) < c.events:
            self.shift_ts = int(self.impression_ts[int(c.shift_at * c.events)])
            self.interests_after[self.shifted_users] = redrawn[self.shifted_users]
        else:
            self.shifted_users = self.shifted_users[:0]

        # slates over the items that have arrived, truth, labels, click delays
        available = c.items + np.searchsorted(
            self.item_arrival_ts[c.items :], self.impression_ts, side="right"
        )
        self.slates = np.empty((c.events, c.slate_size), dtype=np.int64)
        for e in range(c.events):
            self.slates[e] = rng.choice(int(available[e]), size=c.slate_size, replace=False)
        self.p_click = self._probability(
            self.impression_user[:, None], self.slates, self.impression_ts[:, None]
        )
        self.labels = (rng.random(self.p_click.shape) < self.p_click).astype(np.int8)
        lo, hi = c.click_delay_ms
        self.click_delay = rng.integers(lo, hi + 1, size=self.p_click.shape)
        self.impression_ids = [f"syn{c.seed}-{e:07d}" for e in range(c.events)]
        self._impression_index = {imp: e for e, imp in enumerate(self.impression_ids)}
        self._item_index = {item: i for i, item in enumerate(self.item_ids)}
        self._user_index = {u: i for i, u in enumerate(self.user_ids)}

    # --- the ground truth -------------------------------------------------------------------
    def _probability(self, user: np.ndarray, item: np.ndarray, ts: np.ndarray) -> np.ndarray:
        after = (
            np.asarray(ts) >= self.shift_ts
            if self.shift_ts is not None
            else np.zeros_like(ts, bool)
        )
        theta = np.where(after[..., None], self.interests_after[user], self.interests_before[user])
        affinity = (theta * self.item_topics[item]).sum(axis=-1)
        return sigmoid(self.config.sharpness * affinity + self.config.bias)

    def text_topic_shares(self) -> np.ndarray:
        """``[items, topics]``: each item's words' shares of each topic's vocabulary (in
        :attr:`item_ids` order), the mixture as the text alone can reveal it (``words_per_item``
        draws from ``phi_i``), for a reference that knows the vocabularies but not ``phi_i``."""
        index = {w: t for t, words in enumerate(self.vocabulary) for w in words}
        out = np.zeros((len(self.item_texts), len(self.vocabulary)))
        for i, text in enumerate(self.item_texts):
            for w in text.split():
                out[i, index[w]] += 1.0
        return out / out.sum(axis=1, keepdims=True).clip(min=1.0)

    def probability(self, user_id: str, item_id: str, ts: int) -> float:
        """The ground-truth ``p(u, i, t)`` for any user, item and event time."""
        try:
            u, i = self._user_index[user_id], self._item_index[item_id]
        except KeyError as exc:
            raise KeyError(f"unknown synthetic user or item {exc.args[0]!r}") from None
        return float(self._probability(np.array(u), np.array(i), np.array(ts)))

    def click_probabilities(self, user_id: str, ts: int) -> np.ndarray:
        """``p(u, i, ts)`` of ``user_id`` for every item of the world (arrived by ``ts`` or not), in
        :attr:`item_ids` order: what :meth:`probability` gives item by item, in one vectorised call."""
        try:
            u = self._user_index[user_id]
        except KeyError:
            raise KeyError(f"unknown synthetic user {user_id!r}") from None
        return self._probability(np.array(u), np.arange(len(self.item_ids)), np.array(ts))

    def true_probability(self, impression_id: str, item_id: str) -> float:
        """The true click probability of ``item_id`` in impression ``impression_id``."""
        try:
            e = self._impression_index[impression_id]
        except KeyError:
            raise KeyError(f"unknown synthetic impression {impression_id!r}") from None
        pos = np.flatnonzero(self.slates[e] == self._item_index.get(item_id, -1))
        if not len(pos):
            raise KeyError(f"item {item_id!r} was not shown in impression {impression_id!r}")
        return float(self.p_click[e, pos[0]])

    def truth(self) -> list[TruthRow]:
        """One row per shown item, in impression order then slate position."""
        rows = []
        for e, imp in enumerate(self.impression_ids):
            user, ts = self.user_ids[self.impression_user[e]], int(self.impression_ts[e])
            for pos, (i, p, y) in enumerate(
                zip(self.slates[e], self.p_click[e], self.labels[e], strict=True)
            ):
                rows.append(TruthRow(imp, user, self.item_ids[i], pos, ts, float(p), int(y)))
        return rows

    def best_auc(self, examples: Iterable[_Example] | None = None) -> float:
        """AUC of the true probabilities against the labels of ``examples`` (default: all shown items).

        ``examples`` may be :class:`TruthRow` s or ``Labeled`` records from the
        join: anything with ``impression_id``, ``item_id`` and ``label``.  This
        is the best AUC any model can expect on those examples.
        """
        if examples is None:
            return auc(self.p_click.ravel(), self.labels.ravel())
        pairs = [
            (self.true_probability(x.impression_id, x.item_id), int(x.label)) for x in examples
        ]
        return auc([p for p, _ in pairs], [y for _, y in pairs])

    # --- records ------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        return {
            ITEMS.name: len(self.item_ids),
            IMPRESSIONS.name: self.config.events,
            CLICKS.name: int(self.labels.sum()),
        }

    def __len__(self) -> int:
        return sum(self.counts().values())

    def time_range(self) -> tuple[int, int]:
        """(first, last) event time of the stream, epoch ms."""
        first = self.config.start_ts_ms
        last = max(int(self.item_arrival_ts.max()), first)
        if self.config.events:
            delays = np.where(self.labels == 1, self.click_delay, 0).max(axis=1)
            last = max(last, int((self.impression_ts + delays).max()))
        return first, last

    def _item(self, i: int) -> Item:
        return Item(
            item_id=self.item_ids[i],
            text=self.item_texts[i],
            categories=self.item_categories[i],
            ts=int(self.item_arrival_ts[i]),
        )

    def stream(self) -> Iterator[ReplayEvent]:
        """Items (initial and arriving), impressions and clicks, in event-time order.

        At equal event time: items, then impressions, then clicks.
        """
        events = self.config.events
        click_e, click_pos = np.nonzero(self.labels)
        click_ts = self.impression_ts[click_e] + self.click_delay[click_e, click_pos]
        n_items = len(self.item_ids)
        order = event_order(
            np.concatenate([self.item_arrival_ts, self.impression_ts, click_ts]),
            np.concatenate(
                [
                    np.full(n_items, _KIND_ITEM),
                    np.full(events, _KIND_IMPRESSION),
                    np.full(len(click_e), _KIND_CLICK),
                ]
            ),
            np.concatenate([np.arange(n_items), np.arange(events), np.arange(len(click_e))]),
        )
        p_click = self.p_click.tolist()
        for j in order.tolist():
            if j < n_items:
                yield ITEMS, self._item(j)
            elif j < n_items + events:
                e = j - n_items
                yield (
                    IMPRESSIONS,
                    Impression(
                        impression_id=self.impression_ids[e],
                        user_id=self.user_ids[self.impression_user[e]],
                        items=[self.item_ids[i] for i in self.slates[e]],
                        ts=int(self.impression_ts[e]),
                        context={"synthetic": True, "p_click": p_click[e]},
                    ),
                )
            else:
                c = j - n_items - events
                e, pos = int(click_e[c]), int(click_pos[c])
                yield (
                    CLICKS,
                    Click(
                        impression_id=self.impression_ids[e],
                        user_id=self.user_ids[self.impression_user[e]],
                        item_id=self.item_ids[self.slates[e, pos]],
                        ts=int(click_ts[c]),
                    ),
                )
