"""The default learner on streams and settings it was not tuned on, beside every baseline of each run.

The defaults were chosen on ``make evaluate``'s two streams (synthetic seed 0
and its 100 users, 2,000 impressions, batch 256; MovieLens's first 20k
ratings).  This script runs ``harness.evaluate`` (default and static
strategies, every baseline) on other worlds and slices: more and fewer
users, a partial interest shift, smaller batches, other seeds and a longer
MovieLens slice, and prints per setting the default's overall AUC, the best
cheap baseline's (item click rate, user x category click rate, matrix
factorisation, River) with the paired difference, static's, and on
synthetic the learnable references.  The last line is JSON.

    .venv/bin/python -m benchmarks.unseen_streams             # ~6 minutes on 2 CPU cores
    .venv/bin/python -m benchmarks.unseen_streams --only syn-u50,syn-b128
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from harness import evaluate

log = logging.getLogger("benchmarks.unseen_streams")

SETTINGS: dict[str, list[str]] = {
    "syn-u300": ["--dataset", "synthetic", "--users", "300", "--events", "6000", "--seed", "5"],
    "syn-u50": ["--dataset", "synthetic", "--users", "50", "--seed", "6"],
    "syn-shift0.3": ["--dataset", "synthetic", "--shift-fraction", "0.3", "--seed", "7"],
    "syn-b128": ["--dataset", "synthetic", "--batch-size", "128", "--seed", "8"],
    "ml20k-s2": ["--dataset", "movielens", "--seed", "2"],
    "ml40k-s3": ["--dataset", "movielens", "--limit", "40000", "--seed", "3"],
}
"""Each setting's arguments to ``python -m harness.evaluate`` (beside ``--strategies default,static``)."""


def summarize(name: str, result: dict) -> dict:
    """One setting's row: the default, static, the best cheap baseline and the references."""
    default = result["strategies"]["default"]
    cheap = {n: b for n, b in result["baselines"].items() if b["kind"] == "baseline"}
    best = max(cheap, key=lambda n: cheap[n]["auc"])
    row = {
        "setting": name,
        "default": default["auc"],
        "default_se": default["auc_se"],
        "static": result["strategies"]["static"]["auc"],
        "best_baseline": best,
        "best_baseline_auc": cheap[best]["auc"],
        # auc_diff is the baseline minus the default: the margin is its negative
        "margin": -cheap[best]["auc_diff"],
        "margin_se": cheap[best]["auc_diff_se"],
    }
    row["references"] = {n: b["auc"] for n, b in result["baselines"].items() if b["kind"] == "reference"}
    return row


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help="comma list of settings (default: all of " + ", ".join(SETTINGS) + ")")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per run")
    p.add_argument("--extra", default="", help="more harness.evaluate arguments for every run, after the "
                   "setting's (a later flag wins), e.g. '--events 300' for a quick look")  # fmt: skip
    args = p.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(SETTINGS)
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        p.error(f"--only: unknown setting(s) {', '.join(unknown)}; known: {', '.join(SETTINGS)}")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rows = []
    with tempfile.TemporaryDirectory(prefix="streamrec-unseen-") as tmp:
        for name in tqdm(names, desc="settings", unit="setting", file=sys.stderr):
            out = Path(tmp) / f"{name}.json"
            argv_run = [*SETTINGS[name], *shlex.split(args.extra), "--strategies", "default,static", "--threads", str(args.threads),
                        "--out", str(Path(tmp) / f"{name}.png"), "--json", str(out)]  # fmt: skip
            rc = evaluate.main(argv_run)
            if rc:
                log.error("%s: harness.evaluate exited with %d", name, rc)
                return rc
            rows.append(summarize(name, json.loads(out.read_text())))
    print(f"\n{'setting':<14} {'default':>15} {'static':>7} {'best baseline':>26} {'margin':>16} {'references (synthetic)':>28}")
    for r in rows:
        refs = " / ".join(f"{auc:.3f}" for auc in r["references"].values()) or "-"
        print(
            f"{r['setting']:<14} {r['default']:>7.3f} ± {r['default_se']:.3f} {r['static']:>7.3f} "
            f"{r['best_baseline']:>16} {r['best_baseline_auc']:.3f} {r['margin']:>+8.3f} ± {r['margin_se']:.3f} {refs:>28}"
        )
    print(json.dumps({"benchmark": "unseen_streams", "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
