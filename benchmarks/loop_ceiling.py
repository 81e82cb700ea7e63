"""The closed loop without Kafka: how close to the optimal policy can a learner get, and how fast?

``make loop`` runs the real pipeline (join, trainer, guardrail, hot swaps, scoring agent) in the
synthetic world; what it reaches mixes what the learner can learn with the pipeline's delays (the
first version has to beat the popularity fallback on held-back data before it serves).  This
benchmark runs the same world (``streams.replay.simulate.LoopWorld``, the loop's defaults: its
users, items, arrivals, interest shift and common random numbers) in-process, each **policy**
answering every request greedily with its top-k over the items arrived by then (serving's
``choose``: ties broken by the request id), the user reacting
by the ground truth, and the policy learning from all of its own earlier requests' labeled
examples every ``--learn-every`` requests (no guardrail, no publishing delay):

* ``oracle``: the learnable reference of ``make evaluate`` (``harness.baselines.LearnableOracle``:
  knows every item's topic mixture and the generator's prior, learns each user's interests from
  the labels by Bayes' rule): the ceiling for a learner that sees only these labels;
* ``oracle-text`` and ``oracle-category``: the same Bayes rule knowing less of the items: each
  item's mixture as counted from its text's words, or only its category (one-hot), so that what
  the text can tell of an item is measured apart from what the labels tell of a user;
* ``oracle-gauss``: what ``oracle-text`` knows, with a Gaussian belief of each user's interests
  (``harness.baselines.GaussianOracle``): the ceiling of a per-user Gaussian posterior;
* ``learner``: the trainer's default model and learner (``ModelConfig``/``LearnerConfig``
  defaults, one pass, batches of ``--batch-size``), scoring as serving does;
* ``learner+eps``: the same, exploring as serving does with ``STREAMREC_SERVING_EXPLORE=epsilon``
  (``--epsilon`` per position over the top 50);
* ``learner+ts``: the same, Thompson sampling from the learner's own per-user posterior: each
  request is scored with the user's posterior weights drawn from ``N(mean, s^2 precision^-1)``
  (``--ts-scale`` s; :meth:`trainer.posterior.UserPosterior.sample`), greedy on those scores
  (serving does not do this: the precisions stay in the trainer);
* ``user-cat-ctr`` and ``item-ctr``: the counters of ``make evaluate``, greedy (item-ctr is a
  popularity policy);
* ``random``: a uniform slate.

What the pipeline adds can be put back one part at a time, to see what each costs: ``--serve-from N``
(popularity answers the first N requests, as the fallback does until a version passes the guardrail),
``--lag N`` (a request's examples reach the learner N requests later: the join's window),
``--positive-lag N`` (the positives after N instead: the join emitting a click's positive when it
comes and the negatives at the window's close, ``STREAMREC_JOIN_POSITIVES_AT_CLOSE=false``),
``--holdout F`` (the trainer's held-back share) and ``--teacher`` (distillation towards the last
update, as the trainer distils towards its last published version).

Printed per arm as ``make loop`` prints it (realised clicks over the optimal policy's expected
clicks, before and after the shift, the last window of each phase, the requests until a trailing
window is back at ``--recover-to`` of optimal), over ``--seeds`` seeds, then the mean and standard
error over seeds of the before/after ratios and their last windows, and a JSON last line.

    .venv/bin/python -m benchmarks.loop_ceiling                     # 3 seeds, the loop's world
    .venv/bin/python -m benchmarks.loop_ceiling --requests 6000     # twice as long
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from collections.abc import Sequence

import numpy as np
import torch
from tqdm import tqdm

from benchmarks.world_examples import Histories, candidate_examples, react, slate_examples
from contract.records import Labeled
from harness.baselines import KnownGenerator, make_baseline
from harness.evaluate import field_overrides
from serving.metrics import ServingMetrics
from serving.refresh import Arrived, PosteriorRefresh
from serving.scoring import ExplorePolicy, choose
from serving.snapshot import ServingModel, encode_entries, model_snapshot
from streams.replay.loop_figures import (
    Outcome,
    format_summary,
    format_windows,
    json_line,
    summarize,
    window_rows,
)
from streams.replay.simulate import LoopConfig, LoopWorld
from trainer.catalog import Catalog
from trainer.holdout import held_back
from trainer.learner import ContinualLearner, LearnerConfig, iter_batches
from trainer.model import ModelConfig, build_model

ARMS = ("oracle", "oracle-text", "oracle-category", "oracle-gauss", "learner", "learner+eps", "learner+ts", "learner+refresh",
        "user-cat-ctr", "item-ctr", "random")


class _Policy:
    """Scores a request's candidates; learns from labeled examples."""

    def scores(self, candidates: Sequence[Labeled]) -> np.ndarray:
        raise NotImplementedError

    def learn(self, examples: Sequence[Labeled]) -> None:
        raise NotImplementedError


class _Baseline(_Policy):
    def __init__(self, name: str, world: LoopWorld, seed: int) -> None:
        gen = KnownGenerator.of(world.world)
        self.model = make_baseline(name, [world.item(j) for j in range(len(world.item_ids))], gen, seed=seed)

    def scores(self, candidates: Sequence[Labeled]) -> np.ndarray:
        return np.asarray(self.model.predict(candidates), dtype=np.float64)

    def learn(self, examples: Sequence[Labeled]) -> None:
        self.model.learn(examples)


class _Learner(_Policy):
    def __init__(self, catalog: Catalog, args: argparse.Namespace) -> None:
        model = build_model(ModelConfig(categories=catalog.category_names(), max_history=args.max_history, **args.model_options))
        self.learner = ContinualLearner(model, LearnerConfig(device=args.device, **args.learner_options), catalog)
        self.batch_size = args.batch_size
        self.holdout = args.holdout
        self.teacher = args.teacher

    def scores(self, candidates: Sequence[Labeled]) -> np.ndarray:
        probs, kept = self.learner.predict(candidates)
        out = np.full(len(candidates), -np.inf)
        out[np.asarray(kept, dtype=np.int64)] = probs
        return out

    def learn(self, examples: Sequence[Labeled]) -> None:
        kept = [x for x in examples if not held_back(x.example_id, self.holdout)]  # as the trainer service keeps them back
        for batch in iter_batches(kept, self.batch_size):
            self.learner.step(batch)
        if self.teacher and self.learner.config.distill_weight > 0:  # as the trainer service does at each publish
            self.learner.set_teacher({k: v.clone() for k, v in self.learner.model.trainable_state_dict().items()})

    def user_row(self, candidates: Sequence[Labeled]) -> int:
        model = self.learner.model
        return int(model.user_rows([candidates[0].user_id], model.user_posterior_mean.device)[0])

    def scores_with(self, candidates: Sequence[Labeled], row: int, weights: torch.Tensor) -> np.ndarray:
        """:meth:`scores` with user ``row``'s posterior weights set to ``weights`` for the call."""
        buf = self.learner.model.user_posterior_mean
        mean = buf[row].clone()
        buf[row] = weights.to(buf.device, mean.dtype)
        try:
            return _Learner.scores(self, candidates)
        finally:
            buf[row] = mean


class _ThompsonLearner(_Learner):
    """The learner, scoring each request with one draw of the user's posterior weights."""

    def __init__(self, catalog: Catalog, args: argparse.Namespace, seed: int) -> None:
        super().__init__(catalog, args)
        self.scale = args.ts_scale
        self.rng = torch.Generator().manual_seed(seed)

    def scores(self, candidates: Sequence[Labeled]) -> np.ndarray:
        post = self.learner.user_posterior
        if post is None or not candidates:
            return super().scores(candidates)
        row = self.user_row(candidates)
        return self.scores_with(candidates, row, post.sample(row, scale=self.scale, generator=self.rng))


class _RefreshedLearner(_Learner):
    """The learner as the pipeline runs it: its model is "published" (copied) after each learning
    step, and a serving-side :class:`serving.refresh.PosteriorRefresh` learns every request's labels
    under that copy, ``--refresh-every`` requests later; each user the refresh has seen is scored with
    its mean in place of the learner's."""

    def __init__(self, catalog: Catalog, args: argparse.Namespace) -> None:
        super().__init__(catalog, args)
        self.catalog = catalog
        self.refresh = PosteriorRefresh(ServingMetrics(), every_s=0.0, history_length=args.max_history)
        self.sm: ServingModel | None = None
        self.version = 0
        self.offered = 0  # the examples' offsets in one "labeled" partition
        self.trained = 0

    def learn(self, examples: Sequence[Labeled]) -> None:
        super().learn(examples)
        self.trained += len(examples)  # every request's examples reach the learner in request order
        self.version += 1
        served = copy.deepcopy(self.learner.model).eval()
        entries = [(i, e) for i in self.catalog.item_ids() if (e := self.catalog.get(i)) is not None]
        vecs = encode_entries(served, entries, batch=256)
        self.sm = model_snapshot(self.version, served, entries, vecs, {"labeled:0": self.trained})
        self.refresh.apply(self.sm)  # the new version gets every user's refreshed mean

    def observe(self, examples: Sequence[Labeled]) -> None:
        self.refresh.offer([Arrived(0, self.offered + j, ex) for j, ex in enumerate(examples)])
        self.offered += len(examples)
        if self.sm is not None:
            self.refresh.apply(self.sm, force=True)

    def scores(self, candidates: Sequence[Labeled]) -> np.ndarray:
        post = self.refresh.posterior
        row = self.user_row(candidates) if post is not None and candidates else None
        if row is None or row not in post.rows:  # type: ignore[union-attr]
            return super().scores(candidates)
        return self.scores_with(candidates, row, post.mean[row])  # type: ignore[union-attr]


class _Random(_Policy):
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng([seed, 0x7A4D])

    def scores(self, candidates: Sequence[Labeled]) -> np.ndarray:
        return self.rng.random(len(candidates))

    def learn(self, examples: Sequence[Labeled]) -> None:
        pass


def run_arm(arm: str, world: LoopWorld, args: argparse.Namespace, seed: int) -> list[Outcome]:
    """One policy through every request of the world; the outcomes as ``make loop`` records them."""
    catalog = Catalog()
    known = 0
    while known < world.arrived(int(world.request_ts[0])):  # the catalog at the start, as the trainer
        catalog.upsert(world.item(known))  # service sees it: the model's categories are the catalog's
        known += 1
    policy: _Policy
    if arm in ("learner", "learner+eps"):
        policy = _Learner(catalog, args)
    elif arm == "learner+ts":
        policy = _ThompsonLearner(catalog, args, seed)
    elif arm == "learner+refresh":
        policy = _RefreshedLearner(catalog, args)
    elif arm == "random":
        policy = _Random(seed)
    else:
        policy = _Baseline(arm, world, seed)
    explorer = ExplorePolicy(kind="epsilon" if arm.endswith("+eps") else "off", epsilon=args.epsilon, seed=seed)
    histories = Histories(args.max_history)
    pending: list[Labeled] = []
    fresh: list[Labeled] = []  # the refresh's examples not yet handed to it
    in_flight: list[tuple[int, list[Labeled]]] = []  # (request at which they arrive, examples): --lag
    outcomes: list[Outcome] = []
    clicks = np.zeros(len(world.item_ids))  # per item, for the popularity answers before --serve-from
    optimal = world.optimal()
    for e in tqdm(range(world.cfg.requests), desc=arm, unit="req", leave=False, file=sys.stderr):
        ts = int(world.request_ts[e])
        while known < world.arrived(ts):
            catalog.upsert(world.item(known))
            known += 1
        if e and e % args.learn_every == 0 and pending:
            policy.learn(pending)
            pending = []
        user = world.request_user[e]
        history = histories.of(user)
        if e < args.serve_from:  # the pipeline's start: the popularity fallback answers, the policy learns
            scores = clicks[:known].astype(np.float64)
        else:
            scores = policy.scores(candidate_examples(world, e, range(known), history))
        rows, props = choose(scores, world.item_ids[:known], world.cfg.k, explorer, f"r{e}")  # as serving does
        labels, expected = react(world, e, rows)
        shown = slate_examples(world, e, rows, labels, history, props, arm)
        if args.positive_lag is None:
            in_flight.append((e + args.lag, shown))
        else:  # the join emits a positive at its click, the impression's negatives when its window closes
            in_flight.append((e + args.positive_lag, [x for x in shown if x.label]))
            in_flight.append((e + args.lag, [x for x in shown if not x.label]))
        due = [x for x in in_flight if x[0] <= e]  # the labels the join has emitted by now
        for x in due:
            in_flight.remove(x)
            pending += x[1]
        if isinstance(policy, _RefreshedLearner):
            fresh += [ex for x in due for ex in x[1]]
            if (e + 1) % args.refresh_every == 0:
                policy.observe(fresh)
                fresh = []
        histories.add(user, [world.item_ids[r] for r, y in zip(rows, labels, strict=True) if y])
        np.add.at(clicks, np.asarray(rows, dtype=np.int64), np.asarray(labels, dtype=np.float64))
        outcomes.append(Outcome(
            index=e, request_id=f"r{e}", user_id=user, ts=ts, model_version="fallback:popularity" if e < args.serve_from else arm,
            items=tuple(world.item_ids[r] for r in rows), propensities=None if props is None else tuple(props),
            clicked=tuple(int(j) for j in np.flatnonzero(labels)), expected=expected, optimal=float(optimal[e]),
            latency_s=0.0,
        ))  # fmt: skip
    return outcomes


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    d = LoopConfig()
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma list of {','.join(ARMS)}")
    p.add_argument("--users", type=int, default=d.users)
    p.add_argument("--items", type=int, default=d.items)
    p.add_argument("--new-items", type=int, default=d.new_items)
    p.add_argument("--requests", type=int, default=d.requests)
    p.add_argument("--k", type=int, default=d.k)
    p.add_argument("--position-bias", type=float, default=d.position_bias)
    p.add_argument("--learn-every", type=int, default=100, help="requests between a policy's updates (100 s of event time)")
    p.add_argument("--serve-from", type=int, default=0,
                   help="requests answered by click counts (the popularity fallback) before the policy serves, "
                   "as the pipeline's guardrail holds its first version back (make loop: ~600-1,000)")
    p.add_argument("--refresh-every", type=int, default=10,
                   help="learner+refresh: requests between two refreshes of the serving-side posterior")
    p.add_argument("--lag", type=int, default=0,
                   help="requests between a request and its labeled examples reaching the learner and the "
                   "refresh (the join's window and the pipeline's delays: make loop's 30 s window is ~30)")
    p.add_argument("--positive-lag", type=int, default=None,
                   help="the positives' lag instead (the join emits a click's example when it comes and the "
                   "negatives at the window's close: make loop's positives come ~5 requests after theirs)")
    p.add_argument("--teacher", action="store_true",
                   help="learner arms: distil towards the model of the last update, as the trainer service "
                   "distils towards its last published version (LearnerConfig.distill_weight)")
    p.add_argument("--holdout", type=float, default=0.0,
                   help="learner arms: the fraction of examples the trainer service holds back from training "
                   "for its guardrail (STREAMREC_TRAINER_HOLDOUT_FRACTION, 0.1 in the pipeline); 0 = none")
    p.add_argument("--epsilon", type=float, default=0.1, help="learner+eps: serving's epsilon")
    p.add_argument("--ts-scale", type=float, default=0.5, help="learner+ts: scale of the posterior's standard deviations")
    p.add_argument("--window", type=int, default=d.window)
    p.add_argument("--recover-to", type=float, default=d.recover_to)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--max-history", type=int, default=20)
    p.add_argument("--model-set", action="append", default=[], metavar="FIELD=JSON", help="the learner arms' ModelConfig field")
    p.add_argument("--learner-set", action="append", default=[], metavar="FIELD=JSON", help="the learner arms' LearnerConfig field")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = p.parse_args(argv)
    args.model_options, args.learner_options = field_overrides(p, args.model_set), field_overrides(p, args.learner_set)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = set(arms) - set(ARMS)
    if bad:
        p.error(f"unknown arms {sorted(bad)}; choose from {', '.join(ARMS)}")
    if args.seeds < 1 or args.learn_every < 1:
        p.error("--seeds and --learn-every must be >= 1")
    if args.lag < 0 or (args.positive_lag is not None and args.positive_lag < 0) or not 0.0 <= args.holdout < 1.0:
        p.error(f"--lag and --positive-lag must be >= 0 and --holdout in [0, 1), "
                f"got {args.lag}, {args.positive_lag} and {args.holdout}")
    if not args.ts_scale >= 0.0:
        p.error(f"--ts-scale must be >= 0, got {args.ts_scale}")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    per_seed: dict[str, list[dict]] = {a: [] for a in arms}
    for seed in range(args.seeds):
        cfg = LoopConfig(
            users=args.users, items=args.items, new_items=args.new_items, requests=args.requests, k=args.k,
            position_bias=args.position_bias, window=args.window, recover_to=args.recover_to, rate=None, seed=seed,
        )  # fmt: skip
        world = LoopWorld(cfg)
        rows, summaries = {}, {}
        for arm in arms:
            outcomes = run_arm(arm, world, args, seed)
            rows[arm] = window_rows(outcomes, cfg.window, world.shift_index)
            summaries[arm] = summarize(outcomes, shift_index=world.shift_index, window=cfg.window, recover_to=cfg.recover_to)
            per_seed[arm].append(summaries[arm])
        print(f"\n== seed {seed}: {cfg.requests:,} requests, {cfg.users} users, {cfg.items} + {cfg.new_items} items, k={cfg.k}, "
              f"optimal {float(np.mean(world.optimal())):.2f} clicks per request")  # fmt: skip
        print(format_windows(rows))
        print(format_summary(summaries))
        sys.stdout.flush()

    def mean_se(xs: list[float | None]) -> tuple[float, float]:
        v = np.array([x for x in xs if x is not None], dtype=np.float64)
        if not len(v):
            return math.nan, math.nan
        return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else math.nan

    def get(s: dict, key: str) -> float | None:
        part = s.get(key)
        return None if part is None else part["ratio"]

    table: dict[str, dict] = {}
    print(f"\nover {args.seeds} seeds (mean ± se): realised clicks / optimal")
    print(f"{'arm':<17}{'before':>15}{'bef.last':>15}{'after':>15}{'aft.last':>15}{'recovered':>11}")
    for arm, ss in per_seed.items():
        row = {k: mean_se([get(s, k) for s in ss]) for k in ("before", "before_last_window", "after", "after_last_window")}
        rec = [s["recovery_requests"] for s in ss]
        table[arm] = {**{k: {"mean": m, "se": e} for k, (m, e) in row.items()}, "recovery_requests": rec}
        cells = "".join(f"{m:>8.3f} ± {e:.3f}" if math.isfinite(e) else f"{m:>15.3f}" for m, e in row.values())
        print(f"{arm:<17}{cells}{sum(r is not None for r in rec):>8}/{len(rec)}")
    secs = time.perf_counter() - t0
    print(f"({secs:.0f} s)")
    print(json_line({"seeds": args.seeds, "requests": args.requests, "learn_every": args.learn_every, "arms": table,
                     "model_options": args.model_options, "learner_options": args.learner_options,
                     "seconds": secs}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
