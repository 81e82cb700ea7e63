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
- ``retrain``: periodic full retraining: at the end of each period (or every
  ``--retrain-every`` batches) a fresh model is trained on everything so far
  (``--retrain-epochs`` passes), then serves frozen until the next retrain.

Beside them, on the same batches and split, the baselines of
:mod:`harness.baselines` (``--baselines``): item click rate so far, user x
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

    python -m harness.evaluate --dataset synthetic
    python -m harness.evaluate --dataset movielens              # first 20k ratings
    python -m harness.evaluate --dataset movielens --limit 0    # all 100k
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from contract.records import Item, Labeled
from contract.settings import default_cache_dir
from harness.baselines import (
    BASELINES,
    ORACLES,
    Baseline,
    make_baseline,
    river_version,
)
from harness.replays import Replay, load_movielens, load_synthetic
from harness.report import StrategyResult, _metric, format_table, plot, summarize
from trainer.catalog import Catalog
from trainer.learner import ContinualLearner, LearnerConfig
from trainer.metrics import auc
from trainer.model import ModelConfig, build_model

log = logging.getLogger(__name__)

STRATEGIES = ("static", "naive", "default", "retrain")


# --------------------------------------------------------------------------- strategies
@dataclass
class EvalSettings:
    batch_size: int = 256
    periods: int = 4
    holdout: float = 0.1
    publish_every: int = 20
    retrain_every: int = 0
    """Batches between the retrain strategy's full retrains; 0 = at the end of each period."""
    retrain_epochs: int = 1
    """Passes of each full retrain over everything so far."""


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
    stable = _stable_held(replay, held)
    early_first = early_first_stable = math.nan
    period = 0
    frozen = False
    trained = updates = 0
    batches = _batches(stream, settings.batch_size)
    where = {id(e): k for k, e in enumerate(stream)}
    i_out: list[np.ndarray] = []
    b_out: list[np.ndarray] = []
    for n, batch in enumerate(tqdm(batches, desc=name, unit="batch", leave=False, file=sys.stderr)):
        start_ts = batch[0].impression_ts
        retrain_at: int | None = None
        while period < len(bounds) - 1 and start_ts >= bounds[period]:
            # a period ended: the first period's end is where forgetting is measured from
            if period == 0:
                early_first, early_first_stable = _learner_auc(learner, held), _learner_auc(learner, stable)
            period += 1
            if name == "static":
                frozen = True
            elif name == "retrain" and not settings.retrain_every:
                retrain_at = bounds[period - 1]
        if name == "retrain" and settings.retrain_every and n and n % settings.retrain_every == 0:
            retrain_at = start_ts
        if retrain_at is not None:
            if not frozen:  # the first model learned continually until the first retrain
                trained += learner.examples_trained
                updates += learner.example_updates
            learner = _retrain(model_config, learner_config, replay, stream, retrain_at, settings, catalog)
            trained += learner.examples_trained
            updates += learner.example_updates
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
        early_first, early_first_stable = _learner_auc(learner, held), _learner_auc(learner, stable)
    if name != "retrain":
        trained, updates = learner.examples_trained, learner.example_updates
    return StrategyResult(
        name=name,
        ts=np.concatenate(ts_out) if ts_out else np.zeros(0, np.int64),
        labels=np.concatenate(y_out) if y_out else np.zeros(0),
        probs=np.concatenate(p_out) if p_out else np.zeros(0),
        early_auc_after_first=early_first,
        early_auc_end=_learner_auc(learner, held),
        early_auc_after_first_stable=early_first_stable,
        early_auc_end_stable=_learner_auc(learner, stable),
        seconds=time.perf_counter() - t0,
        trained_examples=trained,
        example_updates=updates,
        index=_cat(i_out, np.int64),
        batch=_cat(b_out, np.int64),
    )


def _cat(parts: Sequence[np.ndarray], dtype: type) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)


def _stable_held(replay: Replay, held: Sequence[Labeled]) -> list[Labeled]:
    """The held-out examples of the replay's stable users (none where it names none)."""
    return [e for e in held if e.user_id in replay.stable_users] if replay.stable_users is not None else []


def _learner_auc(learner: ContinualLearner, held: Sequence[Labeled]) -> float:
    return learner.evaluate(held).get("auc", math.nan) if held else math.nan


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
    """Run one baseline (:mod:`harness.baselines`) prequentially over the learner's batches.

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
    stable = _stable_held(replay, held)
    early_first = early_first_stable = math.nan
    period = 0
    trained = 0
    for n, batch in enumerate(tqdm(_batches(stream, settings.batch_size), desc=name, unit="batch", leave=False, file=sys.stderr)):
        start_ts = batch[0].impression_ts
        while period < len(bounds) - 1 and start_ts >= bounds[period]:
            if period == 0:
                early_first, early_first_stable = _held_auc(model, held), _held_auc(model, stable)
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
        early_first, early_first_stable = _held_auc(model, held), _held_auc(model, stable)
    return StrategyResult(
        name=name,
        ts=_cat(outs["ts"], np.int64),
        labels=_cat(outs["y"], np.float32),
        probs=_cat(outs["p"], np.float64),
        early_auc_after_first=early_first,
        early_auc_end=_held_auc(model, held),
        early_auc_after_first_stable=early_first_stable,
        early_auc_end_stable=_held_auc(model, stable),
        seconds=time.perf_counter() - t0,
        trained_examples=trained,
        index=_cat(outs["i"], np.int64),
        batch=_cat(outs["b"], np.int64),
        kind="reference" if name in ORACLES else "baseline",
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
    """A fresh model trained on every example before ``until_ts``: ``settings.retrain_epochs`` passes.

    The first pass is in event-time order (items join the catalog as they
    arrive); later passes shuffle the batches (fixed seed), as an offline
    retrain over a finished log would.
    """
    catalog = Catalog()
    feed = _Feed(replay.items, catalog)
    if settings.retrain_epochs > 1:  # the later passes see the same example ids on purpose
        learner_config = learner_config.model_copy(update={"dedup_window": 0})
    learner = ContinualLearner(build_model(model_config), learner_config, catalog)
    past = [e for e in stream if e.impression_ts < until_ts]
    batches = _batches(past, settings.batch_size)
    rng = np.random.default_rng(model_config.seed)
    for epoch in range(settings.retrain_epochs):
        order = range(len(batches)) if epoch == 0 else rng.permutation(len(batches))
        for k in tqdm(order, desc=f"retrain {epoch + 1}/{settings.retrain_epochs}", unit="batch", leave=False, file=sys.stderr):
            feed.until(max(e.impression_ts for e in batches[k]))
            learner.step(batches[k])
    learner.catalog = live  # from now on it scores with the catalog of the running replay
    return learner


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
        names = [b for b in BASELINES if b not in ORACLES or replay.generator is not None]
        if river_version() is None:
            log.warning("river is not installed: river-lr skipped (pip install -c constraints.txt river)")
            names.remove("river-lr")
        return names
    names = [b.strip() for b in spec.split(",") if b.strip()]
    bad = [b for b in names if b not in BASELINES]
    if bad:
        raise ValueError(f"unknown baselines {bad}; choose from {', '.join(BASELINES)} (or all, none)")
    if set(names) & set(ORACLES) and replay.generator is None:
        raise ValueError("the oracle baselines run on the synthetic stream only")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m harness.evaluate",
        description="Compare continual-learning strategies on a replay (prequential AUC/log loss, forgetting).",
    )
    p.add_argument("--dataset", choices=("synthetic", "movielens"), default="synthetic")
    p.add_argument("--strategies", default=",".join(STRATEGIES), help=f"comma-separated subset of {','.join(STRATEGIES)}")
    p.add_argument(
        "--baselines", default="all",
        help=f"comma-separated subset of {','.join(BASELINES)} (oracle*: synthetic only), 'all' or 'none'",
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
    p.add_argument(
        "--retrain-every", type=int, default=0,
        help="batches between the retrain strategy's full retrains (0 = at the end of each period)",
    )
    p.add_argument("--retrain-epochs", type=int, default=1, help="passes of each full retrain over everything so far")
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
    p.add_argument(
        "--model-set", action="append", default=[], metavar="FIELD=JSON",
        help="set any ModelConfig field, e.g. --model-set user_category_cross=false (repeatable)",
    )
    p.add_argument(
        "--learner-set", action="append", default=[], metavar="FIELD=JSON",
        help="set any LearnerConfig field, e.g. --learner-set cross_decay=0.98 (repeatable)",
    )
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
        **field_overrides(p, args.model_set),
    )
    learner_config = LearnerConfig(
        seed=args.seed,
        **given(
            lr_towers=args.lr_towers, lr_heads=args.lr_heads, lr_encoder=args.lr_encoder, lr_ids=args.lr_ids,
            updates_per_batch=args.updates_per_batch,
        ),
        **field_overrides(p, args.learner_set),
    )
    if args.retrain_every < 0 or args.retrain_epochs < 1:
        p.error("--retrain-every must be >= 0 and --retrain-epochs >= 1")
    settings = EvalSettings(
        batch_size=args.batch_size, periods=args.periods, holdout=args.holdout, publish_every=args.publish_every,
        retrain_every=args.retrain_every, retrain_epochs=args.retrain_epochs,
    )
    summary, results, bounds = evaluate(
        replay, strategies=strategies, model_config=model_config, learner_config=learner_config, settings=settings,
        baselines=baselines,
    )
    out = args.out or default_cache_dir() / "evaluate" / f"auc_{replay.name}.png"
    plot(replay, results, bounds, out)
    summary["plot"] = str(out)
    if "retrain" in strategies:
        when = f"every {settings.retrain_every} batches" if settings.retrain_every else "at the end of each period"
        summary["retrain_schedule"] = f"a fresh model {when}, {settings.retrain_epochs} pass(es) over everything so far"
    summary["seconds"] = time.perf_counter() - t0
    print(format_table(summary))
    print(f"\nplot: {out}  ({summary['seconds']:.0f}s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(_no_nan(summary), indent=2))
    return 0


def field_overrides(parser: argparse.ArgumentParser, pairs: list[str]) -> dict[str, object]:
    """``FIELD=JSON`` pairs -> keyword arguments (a bare word that is not JSON is a string)."""
    out: dict[str, object] = {}
    for pair in pairs:
        field, sep, raw = pair.partition("=")
        if not sep or not field:
            parser.error(f"expected FIELD=VALUE, got {pair!r}")
        try:
            out[field.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[field.strip()] = raw
    return out


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
