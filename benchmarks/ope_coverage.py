"""Off-policy evaluation, measured: do IPS, SNIPS and DR intervals cover a policy's true click rate?

No Kafka.  Each trial builds a synthetic world (``streams.replay.synthetic``, seed = the trial)
and, in-process, logs uniform-exploration traffic from its ground-truth click probabilities:

* an impression: a user drawn uniformly, ``--candidates`` M items drawn uniformly from the
  catalog (the request's candidates), and a slate of ``--slate`` K of them in uniformly random
  order (serving's exploration at epsilon = 1).  The logged propensity of position j is
  serving's conditional one, ``1/(M - j)`` (the item given the items above it); its marginal
  one is ``1/M``.  Every shown item is clicked with its true probability ``p(u, i)``;
* the target policy is greedy on a noisy model of the truth: it ranks the candidates by
  ``logit p(u, i) + N(0, --noise)`` (the noise is fixed per (user, item), so the policy is a
  fixed function of the context) and shows its top K.  DR's reward model is the same noisy
  model's probability (a realistic, miscalibrated one);
* the **true value** is the policy's on-policy click rate per slot, computed from the ground
  truth over ``--truth-contexts`` fresh contexts: ``E_x[(1/K') sum_{j<K'} p(u, pi_j(x))]``
  with K' = 1 (top-1) or K.

Evaluated settings (``trainer.ope``): *top-1* on the position-0 rows (what the trainer's OPE gate
uses), *top-K marginal* (all rows, marginal propensities, IIPS) and *top-2 cascade* (rows at
positions 0-1 with the logged conditional propensities: prefix weights, RIPS).  For each
(setting, estimator, interval) the table gives the mean estimate, the mean true value, how often
the interval covered the truth (target: >= 90% for a 95% interval) and the mean interval width.

    .venv/bin/python -m benchmarks.ope_coverage                   # 100 trials, 1-2 minutes on 2 cores
    .venv/bin/python -m benchmarks.ope_coverage --trials 20 --impressions 1000   # quicker

Prints the table and a JSON last line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from streams.replay.synthetic import SyntheticConfig, SyntheticStream
from trainer import ope


def _world(seed: int, users: int, items: int) -> SyntheticStream:
    return SyntheticStream(SyntheticConfig(users=users, items=items, new_items=0, events=0,
                                           shift_at=None, slate_size=1, seed=seed))


def _truth(world: SyntheticStream, user: np.ndarray, item: np.ndarray) -> np.ndarray:
    """Ground-truth click probabilities of (user, item) index arrays (broadcast), no drift."""
    ts = np.full(np.broadcast_shapes(user.shape, item.shape), world.config.start_ts_ms)
    return world._probability(user, item, ts)  # the world's own formula, vectorised


def _contexts(rng: np.random.Generator, n: int, users: int, items: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    user = rng.integers(0, users, size=n)
    cands = rng.integers(0, items, size=(n, m))  # m distinct items per context, in random order:
    while True:  # redraw the rows with a repeat (uniform over the ordered m-subsets)
        srt = np.sort(cands, axis=1)
        bad = np.flatnonzero((srt[:, 1:] == srt[:, :-1]).any(axis=1))
        if not len(bad):
            break
        cands[bad] = rng.integers(0, items, size=(len(bad), m))
    return user, cands


def _policy(world: SyntheticStream, noise: np.ndarray, user: np.ndarray, cands: np.ndarray,
            k: int) -> tuple[np.ndarray, np.ndarray]:
    """The target's top-k items [n, k] (greedy on the noisy model) and its model's probabilities [n, m]."""
    p = _truth(world, user[:, None], cands)
    logit = np.log(p) - np.log1p(-p) + noise[user[:, None], cands]
    order = np.argsort(-logit, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(cands, order, axis=1), 1.0 / (1.0 + np.exp(-logit))


def trial(seed: int, args: argparse.Namespace) -> list[tuple[str, str, str, float, float, float, float]]:
    """(setting, estimator, interval, estimate, truth, lower, upper) of one seeded trial."""
    n, m, k = args.impressions, args.candidates, args.slate
    world = _world(seed, args.users, args.items)
    rng = np.random.default_rng(10_000 + seed)
    noise = rng.normal(scale=args.noise, size=(args.users, args.items))

    # the log: uniform slates of k of the m candidates, clicks from the truth
    user, cands = _contexts(rng, n, args.users, args.items, m)
    slate = cands[:, :k]  # the candidates are in random order: their first k are a uniform slate
    y = (rng.random((n, k)) < _truth(world, user[:, None], slate)).astype(np.float64)
    top, model_p = _policy(world, noise, user, cands, k)
    q_logged = model_p[:, :k]  # the noisy model's probability of the shown items (same column order)
    q_top = np.take_along_axis(model_p, np.argsort(-model_p, axis=1, kind="stable")[:, :k], axis=1)

    # the truth: the policy's click rate on fresh contexts
    tu, tc = _contexts(rng, args.truth_contexts, args.users, args.items, m)
    t_top, _ = _policy(world, noise, tu, tc, k)
    p_top = _truth(world, tu[:, None], t_top)  # [N, k]
    truth = {"top-1": float(p_top[:, 0].mean()), f"top-{k} marginal": float(p_top.mean()),
             "top-2 cascade": float(p_top[:, :2].mean())}

    imp = np.repeat(np.arange(n), k)
    pos = np.tile(np.arange(k), n)
    items = slate.reshape(-1)
    chosen = top.reshape(-1)
    cond = 1.0 / (m - pos)
    base = {
        "top-1": (ope.Logged(imp, pos, cond, y.reshape(-1)), pos < 1),
        f"top-{k} marginal": (ope.Logged(imp, pos, np.full(n * k, 1.0 / m), y.reshape(-1), "marginal"), pos < k),
        "top-2 cascade": (ope.Logged(imp, pos, cond, y.reshape(-1)), pos < 2),
    }
    target_all = ope.deterministic(items, chosen, q_logged.reshape(-1), q_top.reshape(-1))
    out = []
    clip = args.clip or None
    for setting, (logged, keep) in base.items():
        log_s, tgt = logged.subset(keep), target_all.subset(keep)
        for kind in ope.KINDS:
            for ci, boot in (("normal", 0), ("bootstrap", args.bootstrap)):
                if ci == "bootstrap" and boot <= 0:
                    continue
                e = ope.estimate(kind, log_s, tgt, clip=clip, level=args.level, bootstrap=boot, seed=seed)
                out.append((setting, kind, ci, e.value, truth[setting], e.lower, e.upper))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ope_coverage", description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=100)
    p.add_argument("--impressions", type=int, default=3000, help="logged impressions per trial")
    p.add_argument("--candidates", type=int, default=10, help="M: candidates per request")
    p.add_argument("--slate", type=int, default=3, help="K: items shown per impression (>= 2)")
    p.add_argument("--users", type=int, default=200)
    p.add_argument("--items", type=int, default=300)
    p.add_argument("--noise", type=float, default=1.0, help="sd of the target model's logit noise")
    p.add_argument("--truth-contexts", type=int, default=50_000)
    p.add_argument("--level", type=float, default=0.95)
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples (0 = normal intervals only)")
    p.add_argument("--clip", type=float, default=0.0, help="weight clipping (0 = off)")
    args = p.parse_args(argv)
    if args.slate < 2 or args.candidates < args.slate:
        p.error("need 2 <= --slate <= --candidates")

    t0 = time.perf_counter()
    rows: dict[tuple[str, str, str], list[tuple[float, float, float, float]]] = defaultdict(list)
    for s in range(args.trials):
        for setting, kind, ci, est, truth, lo, hi in trial(s, args):
            rows[(setting, kind, ci)].append((est, truth, lo, hi))
    elapsed = time.perf_counter() - t0

    print(f"OPE coverage: {args.trials} trials x {args.impressions} impressions, {args.candidates} candidates, "
          f"slates of {args.slate}, uniform logging, greedy target (noise sd {args.noise}), "
          f"{args.level:.0%} intervals{f', clip {args.clip}' if args.clip else ''}; {elapsed:.1f} s")
    print(f"{'setting':<18} {'estimator':<9} {'interval':<9} {'mean est':>9} {'true':>8} {'bias':>8} "
          f"{'coverage':>9} {'mean width':>10} {'undefined':>9}")
    results = []
    for (setting, kind, ci), vals in rows.items():
        a = np.array(vals, dtype=np.float64)
        ok = np.all(np.isfinite(a), axis=1)
        est, truth, lo, hi = a[ok].T if ok.any() else (np.array([math.nan]),) * 4
        cover = float(np.mean((lo <= truth) & (truth <= hi))) if ok.any() else math.nan
        r = {"setting": setting, "estimator": kind, "interval": ci, "mean_estimate": float(est.mean()),
             "true_value": float(truth.mean()), "bias": float((est - truth).mean()),
             "coverage": cover, "mean_width": float((hi - lo).mean()), "undefined": int((~ok).sum()),
             "trials": len(vals)}
        results.append(r)
        print(f"{setting:<18} {kind:<9} {ci:<9} {r['mean_estimate']:>9.4f} {r['true_value']:>8.4f} "
              f"{r['bias']:>+8.4f} {100 * cover:>8.1f}% {r['mean_width']:>10.4f} {r['undefined']:>9}")
    summary = {"benchmark": "ope_coverage", "trials": args.trials, "impressions": args.impressions,
               "candidates": args.candidates, "slate": args.slate, "noise": args.noise, "level": args.level,
               "clip": args.clip, "bootstrap": args.bootstrap, "seconds": round(elapsed, 1), "rows": results}
    print(json.dumps(summary, default=lambda x: None if isinstance(x, float) and not math.isfinite(x) else x))
    return 0


if __name__ == "__main__":
    sys.exit(main())
