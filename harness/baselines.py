"""Baselines for the offline evaluation, fed the same batches as the continual learner.

Every baseline is a plain class with two methods::

    predict(examples) -> np.ndarray   # click probabilities, one per example; learns nothing
    learn(examples) -> None           # learn from labeled examples

and :func:`harness.evaluate.run_baseline` drives them prequentially: each
batch is predicted before the baseline learns from it.  A ``late=True``
positive corrects an earlier negative of the same example: the baselines learn
from it (the count-based ones add the click without a second impression) but
the driver never scores it.

- :class:`ItemCTR` -- the item's click rate so far, beta-smoothed towards the
  global click rate;
- :class:`UserCategoryCTR` -- the user's click rate on the item's categories,
  exponentially decayed in the user's own examples, smoothed towards the
  categories' global rate;
- :class:`LogisticMF` -- online logistic matrix factorisation
  ``sigmoid(b + b_u + b_i + <p_u, q_i>)``, ``k = 16``, Adagrad on each batch;
- :class:`RiverLR` -- River's ``linear_model.LogisticRegression`` on one-hot
  user, item and genre(s), one example at a time;
- :class:`LearnableOracle` (synthetic stream only) -- knows the generator
  (every item's topic mixture ``phi_i``, the sharpness, the bias, the prior of
  the interests) and learns each user's interests ``theta_u`` from past labels
  only: Bayes' rule over draws of the prior, with a small change-point hazard
  so that it can follow a shift.  A learnable reference, below the
  true-probability AUC;
- :class:`GaussianOracle` (synthetic only) -- what ``oracle-text`` knows, but
  its belief of ``sharpness * theta_u`` is a Gaussian (moment-matched to the
  Dirichlet prior), learned by Laplace steps: the best a per-user Gaussian
  posterior such as the learner's (``trainer/posterior.py``) can expect.

Hyperparameters are fixed, round values, not tuned on any stream.  Items and
their categories come from the ``Item`` records at construction; users are
added as they appear.  Also here: standard errors of an AUC
(:func:`trainer.metrics.delong_se`, :func:`bootstrap_auc` over impressions).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

import numpy as np

from contract.records import Item, Labeled

if TYPE_CHECKING:
    from streams.replay.synthetic import SyntheticStream

NO_CATEGORY = "(none)"


class Baseline(Protocol):
    name: str

    def predict(self, examples: Sequence[Labeled]) -> np.ndarray: ...

    def learn(self, examples: Sequence[Labeled]) -> None: ...


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -35.0, 35.0)))


class _Ids:
    """A growing string -> row index map (rows of arrays that grow with it)."""

    def __init__(self, names: Sequence[str] = ()) -> None:
        self.index: dict[str, int] = {}
        for n in names:
            self.index.setdefault(n, len(self.index))

    def __len__(self) -> int:
        return len(self.index)

    def rows(self, names: Sequence[str]) -> np.ndarray:
        idx = self.index
        return np.fromiter((idx.setdefault(n, len(idx)) for n in names), dtype=np.int64, count=len(names))


def _grow(a: np.ndarray, n: int, fill: float = 0.0) -> np.ndarray:
    """``a`` with at least ``n`` rows (capacity doubles; new rows hold ``fill``)."""
    if len(a) >= n:
        return a
    out = np.full((max(n, 2 * len(a), 16), *a.shape[1:]), fill, dtype=a.dtype)
    out[: len(a)] = a
    return out


def _latest_items(items: Sequence[Item]) -> dict[str, Item]:
    out: dict[str, Item] = {}
    for it in items:
        out[it.item_id] = it  # last write wins, as in the compacted topic
    return out


def _fields(examples: Sequence[Labeled]) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    users = [e.user_id for e in examples]
    items = [e.item_id for e in examples]
    y = np.fromiter((e.label for e in examples), dtype=np.float64, count=len(examples))
    late = np.fromiter((e.late for e in examples), dtype=bool, count=len(examples))
    return users, items, y, late


# --------------------------------------------------------------------------- counts
class ItemCTR:
    """The item's click rate so far: ``(clicks_i + s * g) / (shows_i + s)``, ``g`` the global rate so far."""

    name = "item-ctr"

    def __init__(self, items: Sequence[Item], strength: float = 20.0) -> None:
        self.items = _Ids([it.item_id for it in items])
        self.strength = strength
        self.clicks = np.zeros(len(self.items))
        self.shows = np.zeros(len(self.items))

    def _global(self) -> float:
        return (self.clicks.sum() + 0.5) / (self.shows.sum() + 1.0)

    def predict(self, examples: Sequence[Labeled]) -> np.ndarray:
        i = self.items.rows([e.item_id for e in examples])
        self.clicks, self.shows = _grow(self.clicks, len(self.items)), _grow(self.shows, len(self.items))
        return (self.clicks[i] + self.strength * self._global()) / (self.shows[i] + self.strength)

    def learn(self, examples: Sequence[Labeled]) -> None:
        _, item_ids, y, late = _fields(examples)
        i = self.items.rows(item_ids)
        self.clicks, self.shows = _grow(self.clicks, len(self.items)), _grow(self.shows, len(self.items))
        np.add.at(self.clicks, i, y)
        np.add.at(self.shows, i[~late], 1.0)  # a late positive turns a shown negative into a click


class UserCategoryCTR:
    """The user's decayed click rate on the item's categories, smoothed towards their global rate.

    Counts of shows and clicks per (user, category); an item with several
    categories pools them.  Each example of a user multiplies that user's
    counts by ``0.5 ** (1 / half_life)`` first, so the rate follows the user's
    recent examples.  ``p = (c_u + s * g) / (n_u + s)`` with ``c_u, n_u`` the
    user's pooled decayed counts over the item's categories and ``g`` the
    global click rate of those categories.
    """

    name = "user-cat-ctr"

    def __init__(self, items: Sequence[Item], half_life: float = 100.0, strength: float = 5.0) -> None:
        latest = _latest_items(items)
        names = sorted({c for it in latest.values() for c in it.categories} | {NO_CATEGORY})
        self.categories = {c: k for k, c in enumerate(names)}
        self.items = _Ids(list(latest))
        self.item_cats = np.zeros((len(self.items), len(names)))
        for item_id, it in latest.items():
            cats = it.categories or [NO_CATEGORY]
            self.item_cats[self.items.index[item_id], [self.categories[c] for c in cats]] = 1.0
        self.users = _Ids()
        self.decay = 0.5 ** (1.0 / half_life)
        self.strength = strength
        self.clicks = np.zeros((0, len(names)))
        self.shows = np.zeros((0, len(names)))
        self.global_clicks = np.zeros(len(names))
        self.global_shows = np.zeros(len(names))

    def _rows(self, examples: Sequence[Labeled]) -> tuple[np.ndarray, np.ndarray]:
        u = self.users.rows([e.user_id for e in examples])
        i = self.items.rows([e.item_id for e in examples])
        if len(self.items) > len(self.item_cats):  # an item without an Item record
            grown = _grow(self.item_cats, len(self.items))
            grown[len(self.item_cats) :, self.categories[NO_CATEGORY]] = 1.0
            self.item_cats = grown
        self.clicks, self.shows = _grow(self.clicks, len(self.users)), _grow(self.shows, len(self.users))
        return u, self.item_cats[i]

    def predict(self, examples: Sequence[Labeled]) -> np.ndarray:
        u, m = self._rows(examples)
        c = (self.clicks[u] * m).sum(1)
        n = (self.shows[u] * m).sum(1)
        g = ((m @ self.global_clicks) + 0.5) / ((m @ self.global_shows) + 1.0)
        return (c + self.strength * g) / (n + self.strength)

    def learn(self, examples: Sequence[Labeled]) -> None:
        u, m = self._rows(examples)
        _, _, y, late = _fields(examples)
        shown = ~late
        per_user = np.bincount(u[shown], minlength=len(self.users))
        touched = np.flatnonzero(per_user)
        f = self.decay ** per_user[touched]
        self.clicks[touched] *= f[:, None]
        self.shows[touched] *= f[:, None]
        np.add.at(self.clicks, u, y[:, None] * m)
        np.add.at(self.shows, u[shown], m[shown])
        self.global_clicks += (y[:, None] * m).sum(0)
        self.global_shows += m[shown].sum(0)


# --------------------------------------------------------------------------- factorisation
class LogisticMF:
    """Online logistic matrix factorisation ``sigmoid(b + b_u + b_i + <p_u, q_i>)``, Adagrad per batch.

    One Adagrad step per batch on the summed log loss of the batch (gradients
    of a row add over its examples), L2 on the touched rows.  The global bias
    ``b`` is not learned by gradient: it is the logit of the click rate so far.
    """

    name = "mf-16"

    def __init__(
        self, items: Sequence[Item], k: int = 16, lr: float = 0.1, l2: float = 1e-4, init: float = 0.05, seed: int = 0
    ) -> None:
        self.k, self.lr, self.l2, self.init = k, lr, l2, init
        self.rng = np.random.default_rng(seed)
        self.items = _Ids([it.item_id for it in items])
        self.users = _Ids()
        self.clicks, self.shows = 0.0, 0.0
        self.q = self.rng.normal(0.0, init, (len(self.items), k))
        self.bq = np.zeros(len(self.items))
        self.p = np.zeros((0, k))
        self.bp = np.zeros(0)
        self.gq, self.gbq = np.full_like(self.q, 1e-8), np.full_like(self.bq, 1e-8)
        self.gp, self.gbp = np.full_like(self.p, 1e-8), np.full_like(self.bp, 1e-8)

    def _rows(self, examples: Sequence[Labeled]) -> tuple[np.ndarray, np.ndarray]:
        u = self.users.rows([e.user_id for e in examples])
        i = self.items.rows([e.item_id for e in examples])
        for name, ids in (("p", self.users), ("q", self.items)):
            m = getattr(self, name)
            if len(ids) > len(m):
                n_old = len(m)
                m = _grow(m, len(ids))
                m[n_old:] = self.rng.normal(0.0, self.init, (len(m) - n_old, self.k))
                setattr(self, name, m)
                b = "b" + name
                setattr(self, b, _grow(getattr(self, b), len(ids)))
                setattr(self, "g" + name, _grow(getattr(self, "g" + name), len(ids), 1e-8))
                setattr(self, "g" + b, _grow(getattr(self, "g" + b), len(ids), 1e-8))
        return u, i

    @property
    def bias(self) -> float:
        rate = (self.clicks + 0.5) / (self.shows + 1.0)
        return math.log(rate / (1.0 - rate))

    def _logits(self, u: np.ndarray, i: np.ndarray) -> np.ndarray:
        return self.bias + self.bp[u] + self.bq[i] + (self.p[u] * self.q[i]).sum(1)

    def predict(self, examples: Sequence[Labeled]) -> np.ndarray:
        u, i = self._rows(examples)
        return _sigmoid(self._logits(u, i))

    def learn(self, examples: Sequence[Labeled]) -> None:
        if not examples:
            return
        u, i = self._rows(examples)
        y = np.fromiter((e.label for e in examples), dtype=np.float64, count=len(examples))
        err = _sigmoid(self._logits(u, i)) - y  # d loss / d logit
        pu, qi = self.p[u], self.q[i]
        gp = np.zeros_like(self.p)
        gq = np.zeros_like(self.q)
        gbp = np.zeros_like(self.bp)
        gbq = np.zeros_like(self.bq)
        np.add.at(gp, u, err[:, None] * qi)
        np.add.at(gq, i, err[:, None] * pu)
        np.add.at(gbp, u, err)
        np.add.at(gbq, i, err)
        ur, ir = np.unique(u), np.unique(i)
        gp[ur] += self.l2 * self.p[ur]
        gq[ir] += self.l2 * self.q[ir]
        for param, grad, acc, rows in (
            (self.p, gp, self.gp, ur), (self.q, gq, self.gq, ir), (self.bp, gbp, self.gbp, ur), (self.bq, gbq, self.gbq, ir)
        ):
            acc[rows] += grad[rows] ** 2
            param[rows] -= self.lr * grad[rows] / np.sqrt(acc[rows])
        late = np.fromiter((e.late for e in examples), dtype=bool, count=len(examples))
        self.clicks += float(y.sum())
        self.shows += float((~late).sum())


# --------------------------------------------------------------------------- River
def river_version() -> str | None:
    """The installed River version, None when River is not installed."""
    try:
        import river
    except ImportError:
        return None
    return str(river.__version__)


class RiverLR:
    """River's ``LogisticRegression`` on one-hot user, item and genre(s), one example at a time.

    River's own settings except the learning rate: SGD 0.05 for the weights and
    the intercept (River's default 0.01 barely moves one-hot weights that each
    see a few hundred examples).
    """

    name = "river-lr"

    def __init__(self, items: Sequence[Item], lr: float = 0.05) -> None:
        from river import linear_model, optim

        self.model = linear_model.LogisticRegression(optimizer=optim.SGD(lr), intercept_lr=lr)
        self.genres = {
            item_id: [f"g={c}" for c in it.categories] for item_id, it in _latest_items(items).items()
        }

    def _x(self, ex: Labeled) -> dict[str, float]:
        x = {f"u={ex.user_id}": 1.0, f"i={ex.item_id}": 1.0}
        for g in self.genres.get(ex.item_id, ()):
            x[g] = 1.0
        return x

    def predict(self, examples: Sequence[Labeled]) -> np.ndarray:
        m = self.model
        return np.fromiter(
            (m.predict_proba_one(self._x(e)).get(True, 0.0) for e in examples), dtype=np.float64, count=len(examples)
        )

    def learn(self, examples: Sequence[Labeled]) -> None:
        for e in examples:
            self.model.learn_one(self._x(e), bool(e.label))


# --------------------------------------------------------------------------- the learnable oracle
@dataclass(frozen=True)
class KnownGenerator:
    """What the learnable oracle knows of the synthetic generator (everything but the users' interests)."""

    item_topics: Mapping[str, np.ndarray]
    """phi_i, the topic mixture of each item."""
    sharpness: float
    bias: float
    user_concentration: float
    """The Dirichlet parameter the interests theta_u are drawn from (the prior)."""
    text_topics: Mapping[str, np.ndarray] | None = None
    """Each item's words' shares of each topic (``SyntheticStream.text_topic_shares``): the
    mixture as its text reveals it, for the ``oracle-text`` reference."""

    @classmethod
    def of(cls, world: SyntheticStream) -> KnownGenerator:
        """What a synthetic world lets a reference know: its items' mixtures (exact and as their
        words count them), its sharpness, bias and prior."""
        return cls(
            item_topics=dict(zip(world.item_ids, world.item_topics, strict=True)),
            sharpness=world.config.sharpness,
            bias=world.config.bias,
            user_concentration=world.config.user_concentration,
            text_topics=dict(zip(world.item_ids, world.text_topic_shares(), strict=True)),
        )

    def knowing(self, what: str) -> KnownGenerator:
        """The generator as a weaker reference knows it: ``phi`` (all of it), ``text`` (each item's
        mixture as counted from its words instead of ``phi_i``) or ``category`` (only the dominant
        topic, one-hot: what an item's category says)."""
        if what == "phi":
            return self
        if what == "text":
            if self.text_topics is None:
                raise ValueError("this generator carries no text topic shares")
            return replace(self, item_topics=self.text_topics)
        if what == "category":
            eye = np.eye(len(next(iter(self.item_topics.values()))))
            return replace(self, item_topics={i: eye[int(np.argmax(t))] for i, t in self.item_topics.items()})
        raise ValueError(f"unknown knowledge {what!r}; choose phi, text or category")


class LearnableOracle:
    """Bayes' rule over each user's interests, with the generator's prior, items, sharpness and bias.

    The prior ``theta_u ~ Dirichlet(user_concentration)`` is represented by
    ``particles`` draws shared by all users; each user holds a weight per draw,
    its posterior.  A label ``y`` on item ``i`` multiplies the weights by the
    likelihood ``p^y (1 - p)^(1 - y)``, ``p = sigmoid(a * <theta, phi_i> + b)``,
    and the prediction is the posterior mean of ``p`` (the Bayes-optimal
    click probability given the past labels).  To follow a change of
    interests from the labels alone, the belief is a change-point model: before
    each of the user's examples, with probability ``hazard`` the interests
    were re-drawn from the prior (the weights mix towards uniform).  It never
    sees the shift time nor the true interests.
    """

    name = "oracle"

    def __init__(
        self, generator: KnownGenerator, particles: int = 2000, hazard: float = 0.005, seed: int = 0, name: str = "oracle"
    ) -> None:
        self.name = name
        self.gen = generator
        ids = list(generator.item_topics)
        self.items = _Ids(ids)
        phi = np.stack([np.asarray(generator.item_topics[i], dtype=np.float64) for i in ids])
        rng = np.random.default_rng(seed)
        theta = rng.dirichlet(np.full(phi.shape[1], generator.user_concentration), size=particles)
        # p of every (particle, item): the likelihood table
        self.p_table = _sigmoid(generator.sharpness * theta @ phi.T + generator.bias)
        self.hazard = hazard
        self.users = _Ids()
        self.weights = np.zeros((0, particles))

    def _rows(self, examples: Sequence[Labeled]) -> tuple[np.ndarray, np.ndarray]:
        n_old = len(self.users)
        u = self.users.rows([e.user_id for e in examples])
        if len(self.users) > n_old:
            self.weights = _grow(self.weights, len(self.users))
            self.weights[n_old : len(self.users)] = 1.0 / self.weights.shape[1]
        i = np.fromiter((self.items.index[e.item_id] for e in examples), dtype=np.int64, count=len(examples))
        return u, i

    def predict(self, examples: Sequence[Labeled]) -> np.ndarray:
        u, i = self._rows(examples)
        return np.einsum("nm,mn->n", self.weights[u], self.p_table[:, i])

    def learn(self, examples: Sequence[Labeled]) -> None:
        if not examples:
            return
        u, i = self._rows(examples)
        y = np.fromiter((e.label for e in examples), dtype=np.float64, count=len(examples))
        p = self.p_table[:, i]  # particles x examples
        log_lik = np.log(np.where(y[None, :] > 0.5, p, 1.0 - p))
        users, inv, counts = np.unique(u, return_inverse=True, return_counts=True)
        per_user = np.zeros((len(users), p.shape[0]))
        np.add.at(per_user, inv, log_lik.T)
        log_w = np.log(self.weights[users]) + per_user
        log_w -= log_w.max(axis=1, keepdims=True)
        w = np.exp(log_w)
        w /= w.sum(axis=1, keepdims=True)
        h = 1.0 - (1.0 - self.hazard) ** counts  # a re-draw at any of the user's examples of the batch
        self.weights[users] = (1.0 - h)[:, None] * w + h[:, None] / w.shape[1]


class GaussianOracle:
    """A per-user Gaussian posterior with everything else of the generator known.

    Each user's weights ``w_u = sharpness * theta_u`` start at the Gaussian with
    the Dirichlet prior's mean and covariance; a batch of the user's labels is a
    Laplace step (``newton_steps`` Newton iterations of the Bayesian logistic
    regression ``p = sigmoid(<w_u, phi_i> + bias)``, its precision the
    posterior's); the prediction is the probit-moderated predictive
    ``sigmoid(m / sqrt(1 + pi v / 8))``.  Before each batch the belief moves
    towards the prior by the chance ``1 - (1 - hazard)^n`` of a change over the
    user's ``n`` examples (as :class:`LearnableOracle`'s change point, but one
    Gaussian cannot hold both "changed" and "not").  It differs from
    :class:`LearnableOracle` by the shape of the prior only: with the same
    knowledge of the items, the gap between the two is what a sparse
    (Dirichlet) prior is worth over a Gaussian one.
    """

    def __init__(
        self, generator: KnownGenerator, hazard: float = 0.005, newton_steps: int = 3, name: str = "oracle-gauss"
    ) -> None:
        self.name = name
        self.gen = generator
        ids = list(generator.item_topics)
        self.items = _Ids(ids)
        self.phi = np.stack([np.asarray(generator.item_topics[i], dtype=np.float64) for i in ids])
        k = self.phi.shape[1]
        m = np.full(k, 1.0 / k)  # Dirichlet(a, ..., a): mean 1/k, covariance (diag(m) - m m') / (k a + 1)
        cov = (np.diag(m) - np.outer(m, m)) / (k * generator.user_concentration + 1.0)
        s = generator.sharpness
        self.prior_mean = s * m
        self.prior_covariance = s * s * cov + 1e-6 * np.eye(k)  # the simplex makes it singular
        self.prior_precision = np.linalg.inv(self.prior_covariance)
        self.hazard = hazard
        self.newton_steps = newton_steps
        self.users = _Ids()
        self.mean = np.zeros((0, k))
        self.precision = np.zeros((0, k, k))
        self.covariance = np.zeros((0, k, k))

    def _rows(self, examples: Sequence[Labeled]) -> tuple[np.ndarray, np.ndarray]:
        n_old = len(self.users)
        u = self.users.rows([e.user_id for e in examples])
        n = len(self.users)
        if n > n_old:  # new users start at the prior
            self.mean, self.precision, self.covariance = (
                _grow(self.mean, n), _grow(self.precision, n), _grow(self.covariance, n)
            )
            self.mean[n_old:n] = self.prior_mean
            self.precision[n_old:n] = self.prior_precision
            self.covariance[n_old:n] = self.prior_covariance
        i = np.fromiter((self.items.index[e.item_id] for e in examples), dtype=np.int64, count=len(examples))
        return u, i

    def predict(self, examples: Sequence[Labeled]) -> np.ndarray:
        u, i = self._rows(examples)
        z = self.phi[i]
        m = (z * self.mean[u]).sum(1) + self.gen.bias
        v = np.einsum("nk,nkl,nl->n", z, self.covariance[u], z)
        return _sigmoid(m / np.sqrt(1.0 + math.pi * v / 8.0))

    def learn(self, examples: Sequence[Labeled]) -> None:
        if not examples:
            return
        u, i = self._rows(examples)
        y = np.fromiter((e.label for e in examples), dtype=np.float64, count=len(examples))
        for user in np.unique(u):
            sel = u == user
            z, yu = self.phi[i[sel]], y[sel]
            h = 1.0 - (1.0 - self.hazard) ** int(sel.sum())
            prec = (1.0 - h) * self.precision[user] + h * self.prior_precision
            old = (1.0 - h) * self.mean[user] + h * self.prior_mean
            w, hess = old.copy(), prec
            for _ in range(self.newton_steps):
                p = _sigmoid(z @ w + self.gen.bias)
                grad = z.T @ (yu - p) - prec @ (w - old)
                hess = prec + (z * (p * (1.0 - p))[:, None]).T @ z
                w = w + np.linalg.solve(hess, grad)
            self.mean[user], self.precision[user] = w, hess
            self.covariance[user] = np.linalg.inv(hess)


# --------------------------------------------------------------------------- construction
ORACLES = {"oracle": "phi", "oracle-text": "text", "oracle-category": "category", "oracle-gauss": "text"}
"""The learnable references, by row name, and what each knows of the items (:meth:`KnownGenerator.knowing`):
the exact mixtures, the mixtures as counted from the text's words, or only the category;
``oracle-gauss`` is :class:`GaussianOracle` on the words' counts, the others :class:`LearnableOracle`."""
BASELINES = ("item-ctr", "user-cat-ctr", "mf-16", "river-lr", *ORACLES)
"""Every baseline, by row name; the ``oracle*`` rows need a :class:`KnownGenerator` (synthetic only)."""


def make_baseline(name: str, items: Sequence[Item], generator: KnownGenerator | None = None, seed: int = 0) -> Baseline:
    """A fresh baseline by row name (see :data:`BASELINES`)."""
    if name == "item-ctr":
        return ItemCTR(items)
    if name == "user-cat-ctr":
        return UserCategoryCTR(items)
    if name == "mf-16":
        return LogisticMF(items, k=16, seed=seed)
    if name == "river-lr":
        return RiverLR(items)
    if name in ORACLES:
        if generator is None:
            raise ValueError(f"the learnable {name} needs the generator (synthetic stream only)")
        known = generator.knowing(ORACLES[name])
        if name == "oracle-gauss":
            return GaussianOracle(known, name=name)
        return LearnableOracle(known, seed=seed, name=name)
    raise ValueError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}")


# --------------------------------------------------------------------------- standard errors
def hanley_mcneil_se(a: float, n_pos: int, n_neg: int) -> float:
    """Hanley & McNeil's (1982) standard error of an AUC ``a`` (exact for exponential score laws)."""
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (n_pos - 1) * (q1 - a * a) + (n_neg - 1) * (q2 - a * a)) / (n_pos * n_neg)
    return math.sqrt(var)


def bootstrap_auc(
    labels: np.ndarray,
    scores: np.ndarray,
    clusters: np.ndarray,
    *,
    n_clusters: int | None = None,
    resamples: int = 200,
    seed: int = 0,
    chunk_elems: int = 4_000_000,
) -> np.ndarray:
    """AUCs of ``resamples`` bootstrap resamples of whole clusters (e.g. impressions).

    ``clusters[j]`` is the cluster index (``0 <= c < n_clusters``) of example
    ``j``.  Each resample draws ``n_clusters`` clusters with replacement (a
    multinomial count per cluster) and weighs every example by its cluster's
    count, so correlated examples of one impression move together.  With the
    same ``seed`` and ``n_clusters``, rows scored on the same examples get the
    same resamples (their differences can be bootstrapped too).  One sort;
    each resample is O(n).
    """
    y = np.asarray(labels) > 0.5
    s = np.asarray(scores, dtype=np.float64)
    c = np.asarray(clusters, dtype=np.int64)
    n_clusters = int(c.max()) + 1 if n_clusters is None else n_clusters
    rng = np.random.default_rng(seed)
    if not len(y) or y.all() or not y.any():
        return np.full(resamples, math.nan)
    order = np.argsort(s, kind="mergesort")
    ss, ys, cs = s[order], y[order], c[order]
    starts = np.r_[0, np.flatnonzero(np.diff(ss)) + 1]  # groups of tied scores
    out = np.empty(resamples)
    per = max(1, chunk_elems // max(len(y), 1))
    uniform = np.full(n_clusters, 1.0 / n_clusters)
    for lo in range(0, resamples, per):
        hi = min(resamples, lo + per)
        counts = rng.multinomial(n_clusters, uniform, size=hi - lo).astype(np.float64)
        w = counts[:, cs]
        wpos = np.add.reduceat(w * ys, starts, axis=1)
        wneg = np.add.reduceat(w * ~ys, starts, axis=1)
        below = np.cumsum(wneg, axis=1) - wneg  # negatives strictly below each group
        num = (wpos * (below + 0.5 * wneg)).sum(1)
        den = wpos.sum(1) * wneg.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[lo:hi] = np.where(den > 0, num / den, np.nan)
    return out
