"""Learning from logged feedback, measured: what position-bias handling buys a model trained on an old policy's logs.

No Kafka.  Each seed builds the closed loop's synthetic world
(``streams.replay.simulate.LoopWorld``: users, item texts and categories,
the ground-truth click probability) with a position effect: an item shown
at position j is clicked with probability ``p(u, i) * --position-bias ** j``.
An **old policy** serves ``--requests`` requests: it ranks the catalog by a
global appeal (each item's mean true probability over the users, plus
fixed noise of sd ``--logging-noise`` on the logit: a popularity model that
knows nothing of the user) and explores as serving does
(``serving.scoring.choose``: epsilon-greedy per position at ``--epsilon``,
with the pool widened to the whole catalog; each shown item's conditional
propensity logged).  Its clicks, drawn from
the truth, become the labeled examples the trainer would consume
(position, propensity, the user's clicked history as of the impression).

Each **arm** trains a fresh default model (``ModelConfig``/``LearnerConfig``
defaults, one pass in event-time order, batches of ``--batch-size``, as the
trainer service does) on the same log:

* ``plain``: the log as it is;
* ``ipw``: the click loss weighs each example by ``min(1/propensity, --clip)``
  (``STREAMREC_TRAINER_IPW_CLIP``);
* ``position``: position as a train-time-only input
  (``ModelConfig.position_slots`` = k);
* ``position+ipw``: both.

Then every arm's greedy top-k policy answers ``--eval-requests`` later
requests (the same users and times for every arm), ranking the whole
catalog from the users' logged histories, and the table gives its expected
clicks under the truth (with the position effect) as a share of the optimal
policy's (the true top-k), beside the old policy's greedy ranking and a
random slate; per arm the mean over seeds, the standard error over seeds,
and the paired difference to ``plain`` with its standard error over seeds.
Also the share of each slate's items that are among the old policy's top
k (how much of the old policy's choice the model inherited).

    .venv/bin/python -m benchmarks.logged_feedback                     # 4 seeds, a few minutes on 2 cores
    .venv/bin/python -m benchmarks.logged_feedback --position-bias 1   # no position effect: the control

Prints the table and a JSON last line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence

import numpy as np
import torch
from tqdm import tqdm

from benchmarks.world_examples import (
    Histories,
    candidate_examples,
    click_probabilities,
    react,
    slate_examples,
)
from contract.records import Labeled
from serving.scoring import ExplorePolicy, choose
from streams.replay.simulate import LoopConfig, LoopWorld
from trainer.catalog import Catalog
from trainer.learner import ContinualLearner, LearnerConfig, iter_batches
from trainer.model import ModelConfig, build_model

ARMS = ("plain", "ipw", "position", "position+ipw")


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


class Log:
    """One seed's world, the old policy's logged examples and the evaluation requests."""

    def __init__(self, seed: int, args: argparse.Namespace) -> None:
        cfg = LoopConfig(
            users=args.users, items=args.items, new_items=0, requests=args.requests + args.eval_requests,
            k=args.k, shift_at=None, position_bias=args.position_bias, rate=None, seed=seed,
        )  # fmt: skip
        self.world = w = LoopWorld(cfg)
        self.k = args.k
        n_items = len(w.item_ids)
        rng = np.random.default_rng([seed, 0x10D])
        users = sorted(set(w.request_user))
        appeal = np.mean([w.world.click_probabilities(u, int(w.request_ts[0])) for u in users], axis=0)
        self.logging_score = _logit(appeal) + rng.normal(0.0, args.logging_noise, n_items)
        self.logging_rank = np.argsort(-self.logging_score, kind="stable")
        # serving's exploration with its pool widened to the whole catalog: every item can be logged
        policy = ExplorePolicy(kind="epsilon", epsilon=args.epsilon, pool=n_items, seed=seed)
        self.examples: list[Labeled] = []
        self.history = Histories(args.max_history)
        self.logging_clicks = 0
        for e in range(args.requests):
            rows, props = choose(self.logging_score, w.item_ids, self.k, policy, f"r{e}")
            labels, _expected = react(w, e, rows)
            user = w.request_user[e]
            self.examples += slate_examples(w, e, rows, labels, self.history.of(user), props, "old-policy")
            self.history.add(user, [w.item_ids[r] for r, y in zip(rows, labels, strict=True) if y])
            self.logging_clicks += int(labels.sum())
        self.eval = list(range(args.requests, args.requests + args.eval_requests))

    def value(self, e: int, items: Sequence[int]) -> float:
        """Expected clicks of showing ``items`` (catalog rows, in order) at request ``e``, over optimal."""
        return float(click_probabilities(self.world, e, items).sum() / self.world.optimal()[e])

    def candidates(self, e: int) -> list[Labeled]:
        """Request ``e``'s user against every item, with the user's logged history."""
        w = self.world
        return candidate_examples(w, e, range(len(w.item_ids)), self.history.of(w.request_user[e]))


def train(log: Log, arm: str, args: argparse.Namespace, catalog: Catalog) -> ContinualLearner:
    model = build_model(ModelConfig(
        categories=catalog.category_names(), max_history=args.max_history, seed=args.model_seed,
        position_slots=log.k if "position" in arm else 0,
    ))  # fmt: skip
    learner = ContinualLearner(model, LearnerConfig(device=args.device, seed=args.model_seed), catalog)
    if "ipw" in arm:
        learner.train_wrapper.ipw_clip = args.clip
    for batch in iter_batches(log.examples, args.batch_size):
        learner.step(batch)
    return learner


def evaluate_arm(log: Log, learner: ContinualLearner) -> tuple[float, float]:
    """(mean value over the evaluation requests, share of the slate in the old policy's top k)."""
    old_top = set(log.logging_rank[: log.k].tolist())
    values, inherited = [], []
    for e in log.eval:
        probs, kept = learner.predict(log.candidates(e))
        rows = np.array(kept)
        top = rows[np.argsort(-probs, kind="stable")[: log.k]]
        values.append(log.value(e, top))
        inherited.append(len(old_top & set(top.tolist())) / log.k)
    return float(np.mean(values)), float(np.mean(inherited))


def run(args: argparse.Namespace) -> dict:
    per_seed: dict[str, list[float]] = {a: [] for a in (*args.arms, "old policy", "random")}
    inherited: dict[str, list[float]] = {a: [] for a in args.arms}
    logged_ctr = []
    for seed in tqdm(range(args.seeds), desc="seeds", unit="seed", file=sys.stderr):
        log = Log(seed, args)
        logged_ctr.append(log.logging_clicks / args.requests)
        w = log.world
        catalog = Catalog([w.item(j) for j in range(len(w.item_ids))])
        per_seed["old policy"].append(float(np.mean([log.value(e, log.logging_rank[: log.k]) for e in log.eval])))
        rng = np.random.default_rng([seed, 0xA11])
        per_seed["random"].append(float(np.mean([
            log.value(e, rng.choice(len(w.item_ids), log.k, replace=False)) for e in log.eval
        ])))  # fmt: skip
        for arm in args.arms:
            learner = train(log, arm, args, catalog)
            v, inh = evaluate_arm(log, learner)
            per_seed[arm].append(v)
            inherited[arm].append(inh)
            tqdm.write(f"seed {seed} {arm:<13} value/optimal {v:.4f}  in the old top-k {inh:.2f}", file=sys.stderr)
    n = args.seeds

    def se(xs: Sequence[float]) -> float:
        return float(np.std(xs, ddof=1) / math.sqrt(len(xs))) if len(xs) > 1 else math.nan

    rows = {}
    for name, vals in per_seed.items():
        row = {"value": float(np.mean(vals)), "value_se": se(vals), "per_seed": vals}
        if name in inherited:
            row["in_old_top_k"] = float(np.mean(inherited[name]))
            if name != "plain" and "plain" in per_seed:
                d = np.array(vals) - np.array(per_seed["plain"])
                row["minus_plain"], row["minus_plain_se"] = float(d.mean()), se(d.tolist())
        rows[name] = row
    return {
        "seeds": n, "requests": args.requests, "eval_requests": args.eval_requests, "users": args.users,
        "items": args.items, "k": args.k, "position_bias": args.position_bias, "epsilon": args.epsilon,
        "logging_noise": args.logging_noise, "clip": args.clip, "logged_clicks_per_request": float(np.mean(logged_ctr)),
        "rows": rows,
    }  # fmt: skip


def format_table(res: dict) -> str:
    lines = [
        f"{res['seeds']} seeds; {res['requests']:,} logged requests (k={res['k']}, epsilon {res['epsilon']}, "
        f"position bias {res['position_bias']}, {res['logged_clicks_per_request']:.2f} clicks per request), "
        f"{res['eval_requests']} evaluation requests; value = expected clicks / optimal's",
        f"{'arm':<14}{'value':>8}{'± se':>8}{'- plain':>10}{'± se':>8}{'in old top-k':>14}",
    ]
    for name, r in res["rows"].items():
        diff = f"{r['minus_plain']:>+10.4f}{r['minus_plain_se']:>8.4f}" if "minus_plain" in r else " " * 18
        inh = f"{r['in_old_top_k']:>14.2f}" if "in_old_top_k" in r else ""
        lines.append(f"{name:<14}{r['value']:>8.4f}{r['value_se']:>8.4f}{diff}{inh}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--requests", type=int, default=3_000, help="requests the old policy serves (the log)")
    p.add_argument("--eval-requests", type=int, default=300)
    p.add_argument("--users", type=int, default=200)
    p.add_argument("--items", type=int, default=300)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--position-bias", type=float, default=0.8, help="click probability at position j: p x this^j")
    p.add_argument("--epsilon", type=float, default=0.2, help="the old policy's exploration per position")
    p.add_argument("--logging-noise", type=float, default=1.0, help="sd of the old policy's error on the logit")
    p.add_argument("--clip", type=float, default=10.0, help="the ipw arms' weight clip")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma list of {','.join(ARMS)}")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--max-history", type=int, default=20)
    p.add_argument("--model-seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = p.parse_args(argv)
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = set(args.arms) - set(ARMS)
    if bad:
        p.error(f"unknown arms {sorted(bad)}; choose from {', '.join(ARMS)}")
    if not 0.0 < args.position_bias <= 1.0:
        p.error("--position-bias must be in (0, 1]")
    if not 0.0 < args.epsilon <= 1.0:
        p.error("--epsilon must be in (0, 1]: without exploration the log has no propensity below 1")
    if args.seeds < 1 or args.requests < 1 or args.eval_requests < 1 or args.clip < 1:
        p.error("--seeds, --requests, --eval-requests must be >= 1 and --clip >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    res = run(args)
    res["seconds"] = time.perf_counter() - t0
    print(format_table(res))
    print(f"({res['seconds']:.0f} s)")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
