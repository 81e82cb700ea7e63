"""Offline evaluation: run the continual learner over a replay, without Kafka, and compare strategies.

Every strategy sees the same labeled stream, in event-time order, batch by
batch, and is scored prequentially (each batch is predicted before anything
learns from it):

- ``static``: trained on the first period, then frozen;
- ``naive``: fine-tunes everything (all encoder layers), no replay, no distillation;
- ``default``: the production setting: top encoder layer(s) tuned on cached
  frozen prefixes (+ LoRA with ``--lora-rank``), reservoir replay, and
  distillation from the last published model (published every
  ``--publish-every`` batches, as the trainer service does);
- ``retrain``: periodic full retraining: at the end of each period a fresh
  model is trained on everything so far, then serves the next period frozen.

Beside them, on the same batches and split, the baselines of
:mod:`trainer.baselines` (``--baselines``): item click rate so far, user x
category click rate (decayed), online logistic matrix factorisation (k=16),
River's logistic regression on one-hot user/item/genre, and on the synthetic
stream a learnable oracle that knows the generator but the users' interests.

Printed: prequential AUC (with the standard error of the overall AUC, a
bootstrap over impressions) and log loss per period and overall, examples
trained on and wall time per row, and forgetting: the AUC on an early
held-out slice (impressions of the first period that no row trains on) right
after the first period and after the whole run.  On the synthetic drift
stream the best achievable AUC (of the true click probabilities) is printed
too, and the recovery after the interest shift: batches until a row's AUC over
the last 5 batches reaches 0.9 x the oracle's on the same examples.  A PNG
plot of AUC over event time goes to ``--out``.

    python -m trainer.evaluate --dataset synthetic
    python -m trainer.evaluate --dataset movielens              # first 20k ratings
    python -m trainer.evaluate --dataset movielens --limit 0    # all 100k
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from streams.records import Click, Impression, Item, Labeled, example_id
from streams.settings import default_cache_dir
from trainer.baselines import (
    BASELINES,
    Baseline,
    KnownGenerator,
    bootstrap_auc,
    make_baseline,
    river_version,
)
from trainer.catalog import Catalog
from trainer.learner import ContinualLearner, LearnerConfig
from trainer.metrics import auc, delong_se, log_loss
from trainer.model import ModelConfig, build_model

log = logging.getLogger(__name__)

STRATEGIES = ("static", "naive", "default", "retrain")


# --------------------------------------------------------------------------- replays
@dataclass
class Replay:
    """A labeled stream ready for offline learning."""

    name: str
    items: list[Item]
    examples: list[Labeled]
    """In event-time order (impression time, then slate position)."""
    truth: Callable[[Sequence[Labeled]], float] | None = None
    """Best achievable AUC on some examples (synthetic only)."""
    shift_ts: int | None = None
    notes: dict[str, float] = field(default_factory=dict)
    generator: KnownGenerator | None = None
    """What the learnable oracle may know of the generator (synthetic only)."""


def labeled_examples(
    impressions: Sequence[Impression], clicks: Sequence[Click], *, window_ms: int, history_length: int
) -> list[Labeled]:
    """Labeled examples of a whole stream: the streams engineer's batch reference join when present.

    Fallback (same rules, simplified): each shown item is a positive if the
    user clicked it within ``window_ms`` of the impression (a later click is a
    negative then a late positive), else a negative; the history is the user's
    clicked items before the impression time.
    """
    try:
        from streams.join import reference_join
    except ImportError:  # the join module is part of the project; this keeps evaluate standalone
        reference_join = None
    if reference_join is not None:
        ref = reference_join(impressions, clicks, window_ms=window_ms, history_length=history_length)
        # the join's light example objects -> the Labeled records the trainer consumes
        examples = [e if isinstance(e, Labeled) else e.to_record() for e in ref.examples]
    else:
        examples = _local_join(impressions, clicks, window_ms=window_ms, history_length=history_length)
    order = {imp.impression_id: n for n, imp in enumerate(impressions)}
    examples.sort(key=lambda e: (e.impression_ts, order.get(e.impression_id, 0), e.position, e.late))
    return examples


def _local_join(
    impressions: Sequence[Impression], clicks: Sequence[Click], *, window_ms: int, history_length: int
) -> list[Labeled]:
    first: dict[str, Impression] = {}
    for imp in impressions:
        first.setdefault(imp.impression_id, imp)
    clicked: dict[tuple[str, str], Click] = {}
    for c in clicks:
        imp = first.get(c.impression_id)
        if imp is None or c.user_id != imp.user_id or c.item_id not in imp.items:
            continue
        key = (c.impression_id, c.item_id)
        if key not in clicked or c.ts < clicked[key].ts:
            clicked[key] = c
    by_user: dict[str, list[tuple[int, str, str]]] = {}
    for (iid, item), c in clicked.items():
        by_user.setdefault(c.user_id, []).append((c.ts, item, iid))
    for v in by_user.values():
        v.sort()
    out: list[Labeled] = []
    for imp in first.values():
        hist = [i for ts, i, iid in by_user.get(imp.user_id, []) if ts < imp.ts and iid != imp.impression_id]
        hist = hist[-history_length:]
        end = imp.ts + window_ms
        for pos, item in enumerate(imp.items):
            c = clicked.get((imp.impression_id, item))
            common = dict(
                example_id=example_id(imp.impression_id, item), impression_id=imp.impression_id,
                user_id=imp.user_id, item_id=item, position=pos, history=hist, impression_ts=imp.ts,
            )
            if c is not None and c.ts <= end:
                out.append(Labeled(label=1, value=c.value, label_ts=c.ts, ts=c.ts, **common))
                continue
            out.append(Labeled(label=0, label_ts=end, ts=end, **common))
            if c is not None:
                out.append(Labeled(label=1, value=c.value, label_ts=c.ts, ts=c.ts, late=True, **common))
    return out


def _split(events) -> tuple[list[Item], list[Impression], list[Click]]:  # noqa: ANN001
    items, imps, clicks = [], [], []
    for _spec, rec in events:
        if isinstance(rec, Item):
            items.append(rec)
        elif isinstance(rec, Impression):
            imps.append(rec)
        elif isinstance(rec, Click):
            clicks.append(rec)
    return items, imps, clicks


def load_synthetic(
    *, events: int, seed: int, history_length: int, users: int = 200, shift_fraction: float = 0.5
) -> Replay:
    from streams.replay.synthetic import SyntheticConfig, SyntheticStream

    world = SyntheticStream(
        SyntheticConfig(events=events, users=users, shift_fraction=shift_fraction, seed=seed)
    )
    items, imps, clicks = _split(world.stream())
    examples = labeled_examples(imps, clicks, window_ms=3_600_000, history_length=history_length)
    return Replay(
        name="synthetic",
        items=sorted(items, key=lambda i: i.ts),
        examples=examples,
        truth=lambda exs: world.best_auc(list(exs)),
        shift_ts=world.shift_ts,
        generator=KnownGenerator(
            item_topics=dict(zip(world.item_ids, world.item_topics, strict=True)),
            sharpness=world.config.sharpness,
            bias=world.config.bias,
            user_concentration=world.config.user_concentration,
        ),
    )


def load_movielens(*, limit: int | None, slate_size: int, seed: int, history_length: int) -> Replay:
    """MovieLens-100k; ``limit`` ratings (impressions) in event-time order, 0 or None = all 100k."""
    from infra.assets import movielens_path
    from streams.replay.movielens import MovieLensReplay, MovieLensReplayConfig

    replay = MovieLensReplay.from_path(
        movielens_path(), MovieLensReplayConfig(limit=limit or None, slate_size=slate_size, seed=seed)
    )
    items, imps, clicks = _split(replay.stream())
    examples = labeled_examples(imps, clicks, window_ms=3_600_000, history_length=history_length)
    return Replay(name="movielens", items=sorted(items, key=lambda i: i.ts), examples=examples)


# --------------------------------------------------------------------------- strategies
@dataclass
class StrategyResult:
    name: str
    ts: np.ndarray  # impression ts of each scored example
    labels: np.ndarray
    probs: np.ndarray
    early_auc_after_first: float
    early_auc_end: float
    seconds: float
    trained_examples: int
    index: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    """Position in the stream of each scored example."""
    batch: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    """Batch number of each scored example."""
    kind: str = "strategy"
    """'strategy' (the learner), 'baseline' or 'reference' (the learnable oracle)."""


@dataclass
class EvalSettings:
    batch_size: int = 256
    periods: int = 4
    holdout: float = 0.1
    publish_every: int = 20


class _Feed:
    """Feeds catalog items into a catalog as event time advances."""

    def __init__(self, items: Sequence[Item], catalog: Catalog) -> None:
        self.items, self.catalog, self.next = items, catalog, 0

    def until(self, ts: int) -> None:
        while self.next < len(self.items) and self.items[self.next].ts <= ts:
            self.catalog.upsert(self.items[self.next])
            self.next += 1


def _holdout(examples: Sequence[Labeled], first_period_end: int, share: float) -> tuple[list[Labeled], list[Labeled]]:
    """Split off a share of the first period's impressions (whole impressions, by id hash)."""
    keep, held = [], []
    for ex in examples:
        digest = hashlib.blake2b(ex.impression_id.encode(), digest_size=4).digest()
        if ex.impression_ts < first_period_end and int.from_bytes(digest, "little") / 2**32 < share:
            held.append(ex)
        else:
            keep.append(ex)
    return keep, held


def _batches(examples: Sequence[Labeled], size: int) -> list[list[Labeled]]:
    return [list(examples[i : i + size]) for i in range(0, len(examples), size)]


def _period_bounds(examples: Sequence[Labeled], periods: int) -> list[int]:
    """Impression-time boundaries splitting the examples into equal-count periods."""
    ts = np.array([e.impression_ts for e in examples])
    qs = [int(np.quantile(ts, k / periods)) for k in range(1, periods)]
    return [*qs, int(ts.max()) + 1]


def run_strategy(
    name: str,
    replay: Replay,
    stream: Sequence[Labeled],
    held: Sequence[Labeled],
    bounds: Sequence[int],
    model_config: ModelConfig,
    learner_config: LearnerConfig,
    settings: EvalSettings,
) -> StrategyResult:
    """Run one strategy over the stream; return its prequential predictions and forgetting."""
    t0 = time.perf_counter()
    catalog = Catalog()
    feed = _Feed(replay.items, catalog)
    learner = ContinualLearner(build_model(model_config), learner_config, catalog)
    ts_out: list[np.ndarray] = []
    y_out: list[np.ndarray] = []
    p_out: list[np.ndarray] = []
    early_first = math.nan
    period = 0
    frozen = False
    trained = 0
    batches = _batches(stream, settings.batch_size)
    where = {id(e): k for k, e in enumerate(stream)}
    i_out: list[np.ndarray] = []
    b_out: list[np.ndarray] = []
    for n, batch in enumerate(tqdm(batches, desc=name, unit="batch", leave=False, file=sys.stderr)):
        start_ts = batch[0].impression_ts
        while period < len(bounds) - 1 and start_ts >= bounds[period]:
            # a period ended: the first period's end is where forgetting is measured from
            if period == 0:
                early_first = learner.evaluate(held).get("auc", math.nan)
            period += 1
            if name == "static":
                frozen = True
            elif name == "retrain":
                if period == 1:  # the first model learned continually during the first period
                    trained += learner.examples_trained
                learner = _retrain(model_config, learner_config, replay, stream, bounds[period - 1], settings, catalog)
                trained += learner.examples_trained
                frozen = True
        feed.until(max(e.impression_ts for e in batch))
        if frozen:
            probs, kept = learner.predict(batch)
            scored = [batch[i] for i in kept]
            mask = np.array([not e.late for e in scored], dtype=bool)
            scored = [e for e, m in zip(scored, mask, strict=True) if m]
            probs = probs[mask] if len(probs) else probs
        else:
            learner.step(batch)
            scored, probs = learner.last_scored
            if (
                settings.publish_every
                and learner.config.distill_weight > 0
                and (n + 1) % settings.publish_every == 0
            ):
                learner.set_teacher({k: v.clone() for k, v in learner.model.trainable_state_dict().items()})
        ts_out.append(np.array([e.impression_ts for e in scored], dtype=np.int64))
        y_out.append(np.array([e.label for e in scored], dtype=np.float32))
        p_out.append(np.asarray(probs, dtype=np.float64))
        i_out.append(np.array([where.get(id(e), -1) for e in scored], dtype=np.int64))
        b_out.append(np.full(len(scored), n, dtype=np.int64))
    if math.isnan(early_first):
        early_first = learner.evaluate(held).get("auc", math.nan)
    early_end = learner.evaluate(held).get("auc", math.nan)
    if name != "retrain":
        trained = learner.examples_trained
    return StrategyResult(
        name=name,
        ts=np.concatenate(ts_out) if ts_out else np.zeros(0, np.int64),
        labels=np.concatenate(y_out) if y_out else np.zeros(0),
        probs=np.concatenate(p_out) if p_out else np.zeros(0),
        early_auc_after_first=early_first,
        early_auc_end=early_end,
        seconds=time.perf_counter() - t0,
        trained_examples=trained,
        index=_cat(i_out, np.int64),
        batch=_cat(b_out, np.int64),
    )


def _cat(parts: Sequence[np.ndarray], dtype: type) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)


def _held_auc(model: Baseline, held: Sequence[Labeled]) -> float:
    if not held:
        return math.nan
    y = np.array([e.label for e in held], dtype=np.float64)
    return _metric(y, model.predict(held), auc)


def run_baseline(
    name: str,
    replay: Replay,
    stream: Sequence[Labeled],
    held: Sequence[Labeled],
    bounds: Sequence[int],
    settings: EvalSettings,
    *,
    seed: int = 0,
) -> StrategyResult:
    """Run one baseline (:mod:`trainer.baselines`) prequentially over the learner's batches.

    The same batches, in the same order, as :func:`run_strategy`; examples of
    items not yet in the catalog are dropped (as the learner does), each batch
    is predicted (late positives left out) before the baseline learns from it
    (late positives included), and forgetting is the AUC on the held-out slice
    after the first period and at the end.
    """
    t0 = time.perf_counter()
    model = make_baseline(name, replay.items, replay.generator, seed=seed)
    catalog = Catalog()
    feed = _Feed(replay.items, catalog)
    where = {id(e): k for k, e in enumerate(stream)}
    outs: dict[str, list[np.ndarray]] = {k: [] for k in ("ts", "y", "p", "i", "b")}
    early_first = math.nan
    period = 0
    trained = 0
    for n, batch in enumerate(tqdm(_batches(stream, settings.batch_size), desc=name, unit="batch", leave=False, file=sys.stderr)):
        start_ts = batch[0].impression_ts
        while period < len(bounds) - 1 and start_ts >= bounds[period]:
            if period == 0:
                early_first = _held_auc(model, held)
            period += 1
        feed.until(max(e.impression_ts for e in batch))
        known = catalog.entries()
        batch = [e for e in batch if e.item_id in known]
        scored = [e for e in batch if not e.late]
        probs = np.asarray(model.predict(scored), dtype=np.float64) if scored else np.zeros(0)
        model.learn(batch)
        trained += len(batch)
        outs["ts"].append(np.array([e.impression_ts for e in scored], dtype=np.int64))
        outs["y"].append(np.array([e.label for e in scored], dtype=np.float32))
        outs["p"].append(probs)
        outs["i"].append(np.array([where[id(e)] for e in scored], dtype=np.int64))
        outs["b"].append(np.full(len(scored), n, dtype=np.int64))
    if math.isnan(early_first):
        early_first = _held_auc(model, held)
    return StrategyResult(
        name=name,
        ts=_cat(outs["ts"], np.int64),
        labels=_cat(outs["y"], np.float32),
        probs=_cat(outs["p"], np.float64),
        early_auc_after_first=early_first,
        early_auc_end=_held_auc(model, held),
        seconds=time.perf_counter() - t0,
        trained_examples=trained,
        index=_cat(outs["i"], np.int64),
        batch=_cat(outs["b"], np.int64),
        kind="reference" if name == "oracle" else "baseline",
    )


def _retrain(
    model_config: ModelConfig,
    learner_config: LearnerConfig,
    replay: Replay,
    stream: Sequence[Labeled],
    until_ts: int,
    settings: EvalSettings,
    live: Catalog,
) -> ContinualLearner:
    """A fresh model trained (one pass, in order) on every example before ``until_ts``."""
    catalog = Catalog()
    feed = _Feed(replay.items, catalog)
    learner = ContinualLearner(build_model(model_config), learner_config, catalog)
    past = [e for e in stream if e.impression_ts < until_ts]
    for batch in tqdm(_batches(past, settings.batch_size), desc="retrain", unit="batch", leave=False, file=sys.stderr):
        feed.until(max(e.impression_ts for e in batch))
        learner.step(batch)
    learner.catalog = live  # from now on it scores with the catalog of the running replay
    return learner


# --------------------------------------------------------------------------- reporting
SE_RESAMPLES = 200
SE_SEED = 0
RECOVERY_WINDOW = 5
"""Batches in the sliding window of the recovery figure."""
RECOVERY_SHARE = 0.9
"""Recovered: window AUC >= this share of the learnable oracle's on the same examples."""


def _metric(y: np.ndarray, p: np.ndarray, fn: Callable) -> float:  # noqa: ANN001
    if y.size == 0 or (fn is auc and len(np.unique(y)) < 2):
        return math.nan
    return float(fn(y, p))


def _recovery(r: StrategyResult, ref: StrategyResult, shift_ts: int) -> tuple[int | None, int | None, int]:
    """Batches after the shift until ``r``'s window AUC reaches the share of ``ref``'s (None: never).

    The window holds the scored post-shift examples of the last
    :data:`RECOVERY_WINDOW` batches; both rows are compared on the examples
    they both scored.  Two criteria: the AUC itself (``AUC_r >= share *
    AUC_ref``) and the lift over chance (``AUC_r - 0.5 >= share * (AUC_ref -
    0.5)``, the stricter one: right after a shift the oracle is near chance
    too, so that the plain ratio is met by rows that learn nothing).  Returns
    (batches by AUC, batches by lift, post-shift batches).
    """
    post_ref = ref.ts >= shift_ts
    if not post_ref.any():
        return None, None, 0
    b0, b_end = int(ref.batch[post_ref].min()), int(ref.batch[post_ref].max())
    order = np.argsort(ref.index)
    ref_idx, ref_p = ref.index[order], ref.probs[order]
    post = r.ts >= shift_ts
    by_auc = by_lift = None
    for b in range(b0, b_end + 1):
        m = post & (r.batch >= max(b0, b - RECOVERY_WINDOW + 1)) & (r.batch <= b)
        pos = np.searchsorted(ref_idx, r.index[m])
        ok = (pos < len(ref_idx)) & (ref_idx[np.minimum(pos, len(ref_idx) - 1)] == r.index[m])
        y = r.labels[m][ok]
        a_r = _metric(y, r.probs[m][ok], auc)
        a_ref = _metric(y, ref_p[pos[ok]], auc)
        if not (a_r == a_r and a_ref == a_ref):
            continue
        if by_auc is None and a_r >= RECOVERY_SHARE * a_ref:
            by_auc = b - b0 + 1
        if by_lift is None and a_ref > 0.5 and a_r - 0.5 >= RECOVERY_SHARE * (a_ref - 0.5):
            by_lift = b - b0 + 1
        if by_auc is not None and by_lift is not None:
            break
    return by_auc, by_lift, b_end - b0 + 1


def summarize(
    replay: Replay,
    results: Sequence[StrategyResult],
    bounds: Sequence[int],
    stream: Sequence[Labeled] | None = None,
) -> dict:
    """Per-row (strategies, then baselines), per-period AUC and log loss, overall, SEs, forgetting (JSON-able).

    The SE of each overall AUC is the standard deviation of
    :data:`SE_RESAMPLES` bootstrap resamples of whole impressions (seed
    :data:`SE_SEED`, the same resamples for every row) when ``stream`` is
    given; DeLong's SE (examples independent) is kept beside it.  With the
    same resamples for every row, the difference of each row's AUC to the
    ``default`` strategy's (else the first row's) gets a paired bootstrap SE.
    """
    edges = [-(2**62), *bounds]
    out: dict = {"dataset": replay.name, "periods": len(bounds), "strategies": {}, "baselines": {}}
    clusters = n_clusters = None
    if stream is not None:
        imp: dict[str, int] = {}
        clusters = np.fromiter((imp.setdefault(e.impression_id, len(imp)) for e in stream), dtype=np.int64, count=len(stream))
        n_clusters = len(imp)
        out["se_method"] = f"bootstrap over impressions ({SE_RESAMPLES} resamples, seed {SE_SEED})"
    else:
        out["se_method"] = "DeLong"
    ref = next((r for r in results if r.kind == "reference"), None)
    if replay.shift_ts is not None and ref is not None:
        out["recovery"] = {
            "reference": ref.name, "window_batches": RECOVERY_WINDOW, "share": RECOVERY_SHARE, "shift_ts": replay.shift_ts,
        }
    replicates: dict[str, np.ndarray] = {}
    for r in results:
        per_auc, per_ll = [], []
        for k in range(len(bounds)):
            m = (r.ts >= edges[k]) & (r.ts < edges[k + 1])
            per_auc.append(_metric(r.labels[m], r.probs[m], auc))
            per_ll.append(_metric(r.labels[m], r.probs[m], log_loss))
        se_delong = delong_se(r.labels, r.probs) if r.labels.size else math.nan
        se = se_delong
        if clusters is not None and r.index.size and (r.index >= 0).all():
            reps = bootstrap_auc(
                r.labels, r.probs, clusters[r.index], n_clusters=n_clusters, resamples=SE_RESAMPLES, seed=SE_SEED
            )
            se = float(np.nanstd(reps, ddof=1)) if np.isfinite(reps).sum() > 1 else math.nan
            replicates[r.name] = reps
        row = {
            "kind": r.kind,
            "auc_per_period": per_auc,
            "log_loss_per_period": per_ll,
            "auc": _metric(r.labels, r.probs, auc),
            "auc_se": se,
            "auc_se_delong": se_delong,
            "log_loss": _metric(r.labels, r.probs, log_loss),
            "scored_examples": int(r.labels.size),
            "early_auc_after_first_period": r.early_auc_after_first,
            "early_auc_end": r.early_auc_end,
            "forgetting": r.early_auc_after_first - r.early_auc_end,
            "seconds": r.seconds,
            "trained_examples": r.trained_examples,
        }
        if "recovery" in out and ref is not None and r is not ref:
            row["recovery_batches"], row["recovery_batches_lift"], out["recovery"]["post_shift_batches"] = _recovery(
                r, ref, replay.shift_ts
            )
        out["strategies" if r.kind == "strategy" else "baselines"][r.name] = row
    names = [r.name for r in results]
    base = "default" if "default" in names else (names[0] if names else None)
    if base is not None and base in replicates:
        out["diff_to"] = base
        base_row = {**out["strategies"], **out["baselines"]}[base]
        for group in ("strategies", "baselines"):
            for name, row in out[group].items():
                d = replicates.get(name, np.full(1, np.nan)) - replicates[base]
                row["auc_diff"] = row["auc"] - base_row["auc"]
                row["auc_diff_se"] = float(np.nanstd(d, ddof=1)) if name != base and np.isfinite(d).sum() > 1 else math.nan
    if any(r.name == "river-lr" for r in results):
        out["river_version"] = river_version()
    if replay.truth is not None and results:
        ex_ts = np.array([e.impression_ts for e in replay.examples])
        best = []
        for k in range(len(bounds)):
            sel = [e for e, t in zip(replay.examples, ex_ts, strict=True) if edges[k] <= t < edges[k + 1]]
            best.append(float(replay.truth(sel)) if sel else math.nan)
        out["best_auc_per_period"] = best
        out["best_auc"] = float(replay.truth(replay.examples))
    return out


_NOTES = {
    "item-ctr": "item click rate so far (beta-smoothed)",
    "user-cat-ctr": "user x category click rate (decayed)",
    "mf-16": "online logistic MF, k=16",
    "river-lr": "River LogisticRegression, one-hot user/item/genre",
    "oracle": "learnable: knows phi_i, sharpness, bias; learns theta_u",
}


def format_table(summary: dict) -> str:
    periods = summary["periods"]
    w = 14
    strategies, baselines = summary["strategies"], summary.get("baselines", {})
    learned = {k: v for k, v in baselines.items() if v.get("kind") != "reference"}
    refs = {k: v for k, v in baselines.items() if v.get("kind") == "reference"}

    def fmt(x: float | None, width: int = 8) -> str:
        return f"{x:{width}.3f}" if x is not None and x == x else f"{'-':>{width}}"

    cols = "".join(f"{'P' + str(k + 1):>8}" for k in range(periods))
    lines = [f"dataset: {summary['dataset']}", "", "prequential AUC per period"]
    base = summary.get("diff_to")
    diff_head = f"{'- ' + base:>17}" if base else ""
    lines.append(f"{'row':<{w}}" + cols + f"{'overall':>9}{'SE':>8}{diff_head}{'trained':>10}{'seconds':>9}")

    def diff(s: dict) -> str:
        if not base:
            return ""
        d, se = s.get("auc_diff"), s.get("auc_diff_se")
        if d is None or d != d or se is None or se != se:
            return f"{'':>17}"
        return f"{f'{d:+.3f} +- {se:.4f}':>17}"

    def auc_row(name: str, s: dict) -> str:
        return (
            f"{name:<{w}}" + "".join(fmt(a) for a in s["auc_per_period"]) + " " + fmt(s["auc"]) + fmt(s.get("auc_se"))
            + diff(s) + f"{s['trained_examples']:>10d}{s['seconds']:>9.1f}"
        )

    def section(title: str, rows: dict, fn: Callable[[str, dict], str], notes: bool = True) -> None:
        if rows:
            lines.append(f"-- {title}")
            for name, s in rows.items():
                note = f"   ({_NOTES[name]})" if notes and name in _NOTES else ""
                lines.append(fn(name, s) + note)

    section("strategies", strategies, auc_row)
    section("baselines", learned, auc_row)
    if refs or "best_auc" in summary:
        section("references", refs, auc_row)
        if "best_auc" in summary:
            if not refs:
                lines.append("-- references")
            lines.append(
                f"{'best':<{w}}" + "".join(fmt(a) for a in summary["best_auc_per_period"]) + " " + fmt(summary["best_auc"])
                + "   (true probabilities)"
            )
    footer = [f"SE of the overall AUC: {summary.get('se_method', 'DeLong')}"]
    if base:
        footer.append(f"'- {base}': overall AUC minus {base}'s, +- the paired bootstrap SE of the difference (same resamples)")
    if "river_version" in summary:
        footer.append(f"river-lr ran River {summary['river_version']}")
    lines += footer

    def ll_row(name: str, s: dict) -> str:
        return f"{name:<{w}}" + "".join(fmt(a) for a in s["log_loss_per_period"]) + " " + fmt(s["log_loss"])

    lines += ["", "prequential log loss per period", f"{'row':<{w}}" + cols + f"{'overall':>9}"]
    section("strategies", strategies, ll_row, notes=False)
    section("baselines", learned, ll_row, notes=False)
    section("references", refs, ll_row, notes=False)

    def forget_row(name: str, s: dict) -> str:
        return (
            f"{name:<{w}}{fmt(s['early_auc_after_first_period']):>10}{fmt(s['early_auc_end']):>10}"
            f"{fmt(s['forgetting']):>10}{s['trained_examples']:>10d}{s['seconds']:>10.1f}"
        )

    lines += [
        "",
        "forgetting: AUC on the early held-out slice",
        f"{'row':<{w}}{'after P1':>10}{'at end':>10}{'drop':>10}{'trained':>10}{'seconds':>10}",
    ]
    section("strategies", strategies, forget_row, notes=False)
    section("baselines", learned, forget_row, notes=False)
    section("references", refs, forget_row, notes=False)

    rec = summary.get("recovery")
    if rec:
        lines += [
            "",
            f"recovery after the interest shift: batches (of {rec.get('post_shift_batches', '-')} after it) until "
            f"the AUC over the last {rec['window_batches']} batches reaches {rec['share']:.2f} x the "
            f"{rec['reference']}'s on the same examples; 'lift': the same for AUC - 0.5",
            f"{'row':<{w}}{'AUC':>10}{'lift':>10}",
        ]

        def n(b: int | None) -> str:
            return str(b) if b is not None else "never"

        for title, rows in (("strategies", strategies), ("baselines", learned)):
            if rows:
                lines.append(f"-- {title}")
                for name, s in rows.items():
                    lines.append(f"{name:<{w}}{n(s.get('recovery_batches')):>10}{n(s.get('recovery_batches_lift')):>10}")
    return "\n".join(lines)


def plot(replay: Replay, results: Sequence[StrategyResult], bounds: Sequence[int], out: Path, bins: int = 30) -> Path:
    """AUC over event time (equal-count bins of the stream), one line per row (baselines dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts_all = np.array([e.impression_ts for e in replay.examples])
    edges = np.unique(np.quantile(ts_all, np.linspace(0, 1, bins + 1)).astype(np.int64))
    edges[-1] += 1
    mids = [datetime.fromtimestamp((a + b) / 2000, tz=UTC) for a, b in zip(edges[:-1], edges[1:], strict=True)]
    fig, ax = plt.subplots(figsize=(10, 5))
    for r in results:
        ys = []
        for a, b in zip(edges[:-1], edges[1:], strict=True):
            m = (r.ts >= a) & (r.ts < b)
            ys.append(_metric(r.labels[m], r.probs[m], auc))
        style = {"strategy": "-", "baseline": "--", "reference": "-."}[r.kind]
        ax.plot(mids, ys, marker="." if r.kind == "strategy" else None, ls=style, lw=1.5 if r.kind == "strategy" else 1.0, label=r.name)
    if replay.truth is not None:
        best = []
        for a, b in zip(edges[:-1], edges[1:], strict=True):
            sel = [e for e, t in zip(replay.examples, ts_all, strict=True) if a <= t < b]
            best.append(replay.truth(sel) if sel else math.nan)
        ax.plot(mids, best, "k:", lw=2, label="best (truth)")
    for b in bounds[:-1]:
        ax.axvline(datetime.fromtimestamp(b / 1000, tz=UTC), color="grey", lw=0.5, ls=":")
    if replay.shift_ts is not None:
        ax.axvline(datetime.fromtimestamp(replay.shift_ts / 1000, tz=UTC), color="red", lw=1, label="drift")
    ax.set_xlabel("event time")
    ax.set_ylabel("prequential AUC")
    ax.set_title(f"{replay.name}: AUC over event time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=2)
    fig.autofmt_xdate()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


# --------------------------------------------------------------------------- CLI
def strategy_configs(
    name: str, base_model: ModelConfig, base_learner: LearnerConfig
) -> tuple[ModelConfig, LearnerConfig]:
    plain = {"replay_size": 0, "distill_weight": 0.0}
    if name == "default":
        return base_model, base_learner
    if name == "naive":
        return base_model.model_copy(update={"freeze_layers": 0, "lora_rank": 0}), base_learner.model_copy(update=plain)
    if name in ("static", "retrain"):
        return base_model, base_learner.model_copy(update=plain)
    raise ValueError(f"unknown strategy {name!r}")


def evaluate(
    replay: Replay,
    *,
    strategies: Sequence[str],
    model_config: ModelConfig,
    learner_config: LearnerConfig,
    settings: EvalSettings,
    baselines: Sequence[str] = (),
) -> tuple[dict, list[StrategyResult], list[int]]:
    bounds = _period_bounds(replay.examples, settings.periods)
    stream, held = _holdout(replay.examples, bounds[0], settings.holdout)
    log.info("%s: %d examples (%d held out), %d periods", replay.name, len(stream), len(held), len(bounds))
    results = []
    for name in strategies:
        mc, lc = strategy_configs(name, model_config, learner_config)
        results.append(run_strategy(name, replay, stream, held, bounds, mc, lc, settings))
        log.info("%s done in %.1fs", name, results[-1].seconds)
    for name in baselines:
        results.append(run_baseline(name, replay, stream, held, bounds, settings, seed=model_config.seed))
        log.info("%s done in %.1fs", name, results[-1].seconds)
    return summarize(replay, results, bounds, stream), results, bounds


def baseline_names(spec: str, replay: Replay) -> list[str]:
    """``--baselines``: 'all' (those that can run on this replay), 'none', or a comma list."""
    spec = spec.strip()
    if spec == "none" or not spec:
        return []
    if spec == "all":
        names = [b for b in BASELINES if b != "oracle" or replay.generator is not None]
        if river_version() is None:
            log.warning("river is not installed: river-lr skipped (pip install -c constraints.txt river)")
            names.remove("river-lr")
        return names
    names = [b.strip() for b in spec.split(",") if b.strip()]
    bad = [b for b in names if b not in BASELINES]
    if bad:
        raise ValueError(f"unknown baselines {bad}; choose from {', '.join(BASELINES)} (or all, none)")
    if "oracle" in names and replay.generator is None:
        raise ValueError("the oracle baseline runs on the synthetic stream only")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m trainer.evaluate",
        description="Compare continual-learning strategies on a replay (prequential AUC/log loss, forgetting).",
    )
    p.add_argument("--dataset", choices=("synthetic", "movielens"), default="synthetic")
    p.add_argument("--strategies", default=",".join(STRATEGIES), help=f"comma-separated subset of {','.join(STRATEGIES)}")
    p.add_argument(
        "--baselines", default="all",
        help=f"comma-separated subset of {','.join(BASELINES)} (oracle: synthetic only), 'all' or 'none'",
    )
    p.add_argument("--events", type=int, default=2000, help="synthetic: impressions to generate")
    p.add_argument("--users", type=int, default=100, help="synthetic: users")
    p.add_argument("--shift-fraction", type=float, default=1.0, help="synthetic: share of users whose interests shift")
    p.add_argument("--limit", type=int, default=20_000, help="movielens: ratings to replay (impressions); 0 = all 100k")
    p.add_argument("--slate-size", type=int, default=5, help="movielens: items per impression")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--periods", type=int, default=4)
    p.add_argument("--holdout", type=float, default=0.1, help="share of first-period impressions held out")
    p.add_argument("--publish-every", type=int, default=10, help="batches between teacher updates (default strategy)")
    p.add_argument("--encoder", default=None, help="encoder folder or HF name (default: offline all-MiniLM-L6-v2)")
    p.add_argument(
        "--encoder-layers", type=int, default=1,
        help="keep the first N layers of the encoder (0 = all 6, the trainer's default; 1 keeps the naive "
        "strategy's full fine-tuning affordable on a CPU; the default strategy scored the same with 6)",
    )
    p.add_argument(
        "--freeze-layers", type=int, default=None,
        help="frozen lower layers of the default, static and retrain strategies (default: ModelConfig's, "
        "the whole encoder); naive fine-tuning always tunes every layer",
    )
    p.add_argument("--lora-rank", type=int, default=0)
    p.add_argument("--max-text-len", type=int, default=32)
    p.add_argument("--max-history", type=int, default=20)
    # None = the library default (ModelConfig / LearnerConfig), so the evaluated default is the trainer's
    p.add_argument("--user-buckets", type=int, default=None)
    p.add_argument("--item-buckets", type=int, default=None)
    p.add_argument("--embed-dim", type=int, default=None)
    p.add_argument("--lr-towers", type=float, default=None)
    p.add_argument("--lr-heads", type=float, default=None)
    p.add_argument("--lr-encoder", type=float, default=None)
    p.add_argument("--lr-ids", type=float, default=None)
    p.add_argument("--updates-per-batch", type=int, default=None)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--out", type=Path, default=None, help="PNG plot path (default: .cache/evaluate/auc_<dataset>.png)")
    p.add_argument("--json", type=Path, default=None, help="also write the summary as JSON here")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    bad = set(strategies) - set(STRATEGIES)
    if bad:
        p.error(f"unknown strategies {sorted(bad)}; choose from {', '.join(STRATEGIES)}")

    t0 = time.perf_counter()
    if args.dataset == "synthetic":
        replay = load_synthetic(
            events=args.events, seed=args.seed, history_length=args.max_history,
            users=args.users, shift_fraction=args.shift_fraction,
        )
    else:
        replay = load_movielens(limit=args.limit or None, slate_size=args.slate_size, seed=args.seed, history_length=args.max_history)
    try:
        baselines = baseline_names(args.baselines, replay)
    except ValueError as exc:
        p.error(str(exc))
    model_config = ModelConfig(
        encoder=args.encoder,
        encoder_layers=args.encoder_layers or None,
        max_text_len=args.max_text_len,
        max_history=args.max_history,
        categories=Catalog(replay.items).category_names(),
        value_head=replay.name == "movielens",
        lora_rank=args.lora_rank,
        seed=args.seed,
        **given(
            embed_dim=args.embed_dim, user_buckets=args.user_buckets, item_buckets=args.item_buckets,
            freeze_layers=args.freeze_layers,
        ),
    )
    learner_config = LearnerConfig(
        seed=args.seed,
        **given(
            lr_towers=args.lr_towers, lr_heads=args.lr_heads, lr_encoder=args.lr_encoder, lr_ids=args.lr_ids,
            updates_per_batch=args.updates_per_batch,
        ),
    )
    settings = EvalSettings(batch_size=args.batch_size, periods=args.periods, holdout=args.holdout, publish_every=args.publish_every)
    summary, results, bounds = evaluate(
        replay, strategies=strategies, model_config=model_config, learner_config=learner_config, settings=settings,
        baselines=baselines,
    )
    out = args.out or default_cache_dir() / "evaluate" / f"auc_{replay.name}.png"
    plot(replay, results, bounds, out)
    summary["plot"] = str(out)
    summary["seconds"] = time.perf_counter() - t0
    print(format_table(summary))
    print(f"\nplot: {out}  ({summary['seconds']:.0f}s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(_no_nan(summary), indent=2))
    return 0


def given(**kw: object) -> dict[str, object]:
    """The options given on the command line (None = keep the library default)."""
    return {k: v for k, v in kw.items() if v is not None}


def _no_nan(x: object) -> object:
    """JSON has no NaN: undefined metrics become null."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _no_nan(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_no_nan(v) for v in x]
    return x


if __name__ == "__main__":
    sys.exit(main())
