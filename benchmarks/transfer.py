"""Transfer, measured: a new deployment that starts from another deployment's published version.

No Kafka.  For each pair of streams (source, target):

1. a learner trains prequentially on the *source* stream and its model is
   published to a temporary weight store (:meth:`trainer.weights.WeightStore.publish`);
2. a *warm* learner starts on the *target* stream from that version, loaded
   the way ``STREAMREC_TRAINER_INIT_FROM`` loads it in the trainer
   (:func:`trainer.weights.locate_version`, :func:`trainer.weights.config_mismatch`,
   :meth:`trainer.weights.WeightStore.load_into`), and a *cold* learner starts
   on the same target stream from a fresh model;
3. both are scored prequentially (each batch predicted before it is learned
   from), and the AUC of the **first quarter** of the target stream (by
   example count, in event-time order) is compared, warm vs cold, with a
   paired bootstrap over impressions for the standard errors.

Pairs: MovieLens-100k split by user (users with an even id are the source,
odd ids the target; the movies are shared), and the synthetic world (source:
world seed A, target: a fresh world with seed B, so users and item texts
differ).  Prints the figures and a JSON last line.

    .venv/bin/python -m benchmarks.transfer            # a few minutes on 2 CPU cores
    .venv/bin/python -m benchmarks.transfer --limit 2000 --synthetic-events 500   # quicker
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from contract.records import Item, Labeled
from harness.replays import load_movielens, load_synthetic
from trainer.catalog import Catalog
from trainer.learner import ContinualLearner, LearnerConfig
from trainer.metrics import auc
from trainer.model import ModelConfig, build_model
from trainer.weights import WeightStore, config_mismatch, locate_version

log = logging.getLogger("benchmarks.transfer")


@dataclass
class Run:
    """Prequential predictions of one learner over a stream."""

    impression_ids: list[str]
    labels: np.ndarray
    probs: np.ndarray
    seconds: float
    examples: int


def _feed(catalog: Catalog, items: Sequence[Item]) -> None:
    for it in items:
        catalog.upsert(it)


def run_stream(
    model: torch.nn.Module, items: Sequence[Item], examples: Sequence[Labeled], cfg: LearnerConfig, batch: int
) -> tuple[ContinualLearner, Run]:
    """Test-then-train over ``examples`` in order (every item known from the start, as after a catalog load)."""
    catalog = Catalog()
    _feed(catalog, items)
    learner = ContinualLearner(model, cfg, catalog)  # type: ignore[arg-type]
    ids: list[str] = []
    ys: list[np.ndarray] = []
    ps: list[np.ndarray] = []
    t0 = time.perf_counter()
    for start in range(0, len(examples), batch):
        learner.step(list(examples[start : start + batch]))
        scored, probs = learner.last_scored
        ids.extend(e.impression_id for e in scored)
        ys.append(np.array([e.label for e in scored], dtype=np.float64))
        ps.append(np.asarray(probs, dtype=np.float64))
    run = Run(ids, np.concatenate(ys) if ys else np.zeros(0), np.concatenate(ps) if ps else np.zeros(0),
              time.perf_counter() - t0, len(examples))
    return learner, run


def first_quarter(run: Run, n_target: int, examples: Sequence[Labeled]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The scored examples among the first quarter of the target stream (by impression)."""
    first = {e.impression_id for e in examples[: max(1, n_target // 4)]}
    keep = [i for i, imp in enumerate(run.impression_ids) if imp in first]
    return [run.impression_ids[i] for i in keep], run.labels[keep], run.probs[keep]


def paired_bootstrap(
    imps: list[str], y: np.ndarray, warm: np.ndarray, cold: np.ndarray, *, resamples: int, seed: int
) -> dict[str, float]:
    """AUCs of warm and cold on the same examples and bootstrap standard errors (impressions resampled)."""
    groups: dict[str, list[int]] = {}
    for i, imp in enumerate(imps):
        groups.setdefault(imp, []).append(i)
    rows = list(groups.values())
    rng = np.random.default_rng(seed)
    aw, ac, ad = [], [], []
    for _ in range(resamples):
        pick = rng.integers(0, len(rows), len(rows))
        idx = np.fromiter((j for g in pick for j in rows[g]), dtype=np.int64)
        yy = y[idx]
        if yy.min() == yy.max():
            continue
        a, c = auc(yy, warm[idx]), auc(yy, cold[idx])
        aw.append(a)
        ac.append(c)
        ad.append(a - c)
    w, c = float(auc(y, warm)), float(auc(y, cold))
    return {
        "warm_auc": w, "warm_se": float(np.std(aw, ddof=1)),
        "cold_auc": c, "cold_se": float(np.std(ac, ddof=1)),
        "diff": w - c, "diff_se": float(np.std(ad, ddof=1)),
        "examples": int(len(y)), "impressions": len(rows), "positives": int(y.sum()),
    }


def transfer(
    name: str,
    source_items: Sequence[Item],
    source: Sequence[Labeled],
    target_items: Sequence[Item],
    target: Sequence[Labeled],
    model_cfg: ModelConfig,
    learner_cfg: LearnerConfig,
    *,
    batch: int,
    resamples: int,
    store_root: Path,
) -> dict[str, object]:
    log.info("%s: pretraining on %d source examples", name, len(source))
    pre_learner, pre = run_stream(build_model(model_cfg), source_items, source, learner_cfg, batch)
    store = WeightStore(store_root / name)
    update = store.publish(pre_learner.model, version=1, model_name=f"{name}-source",
                           trained_examples=pre_learner.examples_trained)

    # A new deployment, as STREAMREC_TRAINER_INIT_FROM=<store>/v000001 starts it.
    src_store, version = locate_version(str(store_root / name / "v000001"))
    diffs = config_mismatch(src_store.manifest(version).model_config, model_cfg.model_dump(mode="json"))
    assert not diffs, diffs
    warm_model = build_model(model_cfg)
    src_store.load_into(warm_model, version)

    log.info("%s: warm start on %d target examples", name, len(target))
    _, warm = run_stream(warm_model, target_items, target, learner_cfg, batch)
    log.info("%s: cold start on the same %d target examples", name, len(target))
    _, cold = run_stream(build_model(model_cfg), target_items, target, learner_cfg, batch)
    assert warm.impression_ids == cold.impression_ids  # the same scored examples, in the same order

    imps, y, pw = first_quarter(warm, len(target), target)
    _, _, pc = first_quarter(cold, len(target), target)
    fq = paired_bootstrap(imps, y, pw, pc, resamples=resamples, seed=0)
    whole = {"warm_auc": float(auc(warm.labels, warm.probs)), "cold_auc": float(auc(cold.labels, cold.probs))}
    return {
        "source_examples": len(source), "target_examples": len(target),
        "source_prequential_auc": float(auc(pre.labels, pre.probs)),
        "published_mb": store.manifest(update.version).size / 1e6,
        "first_quarter": fq, "whole_target": whole,
        "seconds": {"pretrain": pre.seconds, "warm": warm.seconds, "cold": cold.seconds},
    }


def _fmt(name: str, r: dict) -> list[str]:  # type: ignore[type-arg]
    fq, whole = r["first_quarter"], r["whole_target"]
    return [
        f"{name}: pretrained on {r['source_examples']:,} source examples (prequential AUC "
        f"{r['source_prequential_auc']:.4f}), published {r['published_mb']:.1f} MB; target stream "
        f"{r['target_examples']:,} examples",
        f"  first quarter of the target ({fq['examples']:,} examples, {fq['impressions']:,} impressions, "
        f"{fq['positives']:,} positives):",
        f"    warm start AUC {fq['warm_auc']:.4f} ± {fq['warm_se']:.4f}   cold start AUC "
        f"{fq['cold_auc']:.4f} ± {fq['cold_se']:.4f}   warm − cold {fq['diff']:+.4f} ± {fq['diff_se']:.4f}",
        f"  whole target stream: warm {whole['warm_auc']:.4f}, cold {whole['cold_auc']:.4f}",
        f"  seconds: pretrain {r['seconds']['pretrain']:.0f}, warm {r['seconds']['warm']:.0f}, "
        f"cold {r['seconds']['cold']:.0f}",
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.transfer", description=__doc__.split("\n\n")[0])
    p.add_argument("--limit", type=int, default=4_000, help="MovieLens ratings replayed (0 = skip MovieLens)")
    p.add_argument("--slate-size", type=int, default=5)
    p.add_argument("--synthetic-events", type=int, default=1_000, help="impressions per synthetic world (0 = skip)")
    p.add_argument("--synthetic-users", type=int, default=100, help="users per synthetic world")
    p.add_argument("--seed-a", type=int, default=1, help="synthetic source world seed")
    p.add_argument("--seed-b", type=int, default=2, help="synthetic target world seed")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--encoder-layers", type=int, default=2,
                   help="encoder layers kept (default 2: the lower one frozen and cached, the top one tuned, "
                   "as in production with fewer layers; 0 = all 6)")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the standard errors")
    p.add_argument("--model-options", default="{}", help="other ModelConfig fields, as JSON")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.manual_seed(0)
    learner_cfg = LearnerConfig(device="cpu")
    extra = json.loads(args.model_options)
    if args.encoder_layers:
        extra.setdefault("encoder_layers", args.encoder_layers)
    results: dict[str, object] = {}
    lines: list[str] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="transfer-") as tmp:
        if args.limit:
            ml = load_movielens(limit=args.limit, slate_size=args.slate_size, seed=0, history_length=50)
            cats = sorted({c for it in ml.items for c in (it.categories or [])})
            cfg = ModelConfig(categories=cats, **extra)
            even = [e for e in ml.examples if int(e.user_id) % 2 == 0]
            odd = [e for e in ml.examples if int(e.user_id) % 2 == 1]
            results["movielens"] = r = transfer("movielens", ml.items, even, ml.items, odd, cfg, learner_cfg,
                                                batch=args.batch_size, resamples=args.bootstrap,
                                                store_root=Path(tmp))
            lines += _fmt(f"MovieLens-100k ({args.limit:,} ratings, slates of {args.slate_size}): even users -> "
                          "odd users", r)
        if args.synthetic_events:
            a = load_synthetic(events=args.synthetic_events, seed=args.seed_a, history_length=50,
                               users=args.synthetic_users)
            b = load_synthetic(events=args.synthetic_events, seed=args.seed_b, history_length=50,
                               users=args.synthetic_users)
            cats = sorted({c for it in [*a.items, *b.items] for c in (it.categories or [])})
            cfg = ModelConfig(categories=cats, **extra)
            results["synthetic"] = r = transfer("synthetic", a.items, a.examples, b.items, b.examples, cfg,
                                                learner_cfg, batch=args.batch_size, resamples=args.bootstrap,
                                                store_root=Path(tmp))
            lines += _fmt(f"synthetic ({args.synthetic_events:,} impressions per world): world seed "
                          f"{args.seed_a} -> fresh world seed {args.seed_b}", r)
    results["seconds"] = time.perf_counter() - t0
    results["model_config"] = {k: v for k, v in extra.items()}
    print("== transfer: warm start from a published version vs cold start ==")
    print("\n".join(lines))
    print(f"total {results['seconds']:.0f} s")
    print(json.dumps(results, default=lambda x: None if isinstance(x, float) and not math.isfinite(x) else x))
    return 0


if __name__ == "__main__":
    sys.exit(main())
