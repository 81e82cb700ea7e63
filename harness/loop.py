"""``make loop``: the closed loop of :mod:`streams.replay.simulate` for four arms, each a pipeline of its own.

Every arm runs the same world and the same request schedule (same seed: the same users
at the same event times, the same common random numbers for the clicks) through its own
services, topics (prefix ``loop-<run>-<arm>-``) and consumer groups, one arm after the
other on one broker:

1. ``explore``: the continual system (streams worker, trainer, scoring agent) with
   exploration (``STREAMREC_SERVING_EXPLORE``, epsilon by default);
2. ``greedy``: the same without exploration;
3. ``frozen``: the same as ``greedy``, but the trainer is killed as soon as its log says
   it published (announced) its first version, so that version is the last one served
   (and the agent's per-user posterior, ``serving/refresh.py``, is off: nothing learns);
4. ``popularity``: streams worker and scoring agent only, no trainer (the agent's
   popularity fallback answers everything).

The services are started the way :mod:`harness.pipeline` starts them
(:func:`harness.pipeline.pipeline_services`, :class:`infra.processes.ServiceGroup`), with
the join's window shortened to 30 s of event time (the simulated users click within 10 s;
the default 30 minutes would hold every negative back for 1,800 requests).  The run
waits until the agent (and the trainer) say they are ready, produces the initial catalog
before the services start, and then runs the loop.  It prints per-window click rate /
optimal for every arm, a summary (before and after the shift, the requests to recover to
85% of optimal, cumulative reward), paired differences between arms on the same
requests, the issue's targets with whether each was met, writes a PNG of the curves and
``loop.json`` to the run folder under ``.cache/loop/`` and ends with a JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contract.errors import ConfigError, StreamrecError
from contract.settings import KafkaSettings, default_cache_dir, load
from harness.demo import broker_for_demo
from harness.pipeline import PipelineConfig, pipeline_services
from infra.admin import ensure_topics
from infra.broker import LIBRDKAFKA_LOGGER, BrokerError
from infra.processes import Service, ServiceGroup
from streams.replay.cli import add_simulate_arguments, loop_config
from streams.replay.loop_figures import (
    first_trained,
    format_summary,
    format_windows,
    json_line,
    paired_difference,
    trailing_ratio,
)
from streams.replay.simulate import (
    LoopConfig,
    LoopRun,
    LoopWorld,
    produce_catalog,
    run_closed_loop,
    shared_namespace,
)

log = logging.getLogger(__name__)

LOOP_JOIN_SETTINGS: dict[str, Any] = {"window_ms": 30_000, "idle_timeout_s": 3}
"""The join of every arm: a 30 s attribution window (clicks come 0.5-10 s after the impression)."""
READY = {
    "serving": re.compile(r"serving \S+: .* ready in"),
    "trainer": re.compile(r"training from "),
}
"""Log lines that say a service is ready (the agent is assigned its requests; the trainer has its catalog)."""
PUBLISHED = re.compile(r"published version (\d+)")
BEFORE_TARGET, RECOVER_TARGET = 0.90, 0.85


@dataclass(frozen=True)
class Arm:
    name: str
    label: str
    trainer: bool = True
    explore: str = "off"
    freeze: bool = False
    """Stop the trainer once it has published its first version."""


def default_arms(explore: str = "epsilon") -> list[Arm]:
    return [
        Arm("explore", f"continual + {explore}", explore=explore),
        Arm("greedy", "continual, greedy"),
        Arm("frozen", "frozen first version", freeze=True),
        Arm("popularity", "popularity, no trainer", trainer=False),
    ]


@dataclass
class ArmResult:
    arm: Arm
    run: LoopRun
    startup_s: float
    elapsed_s: float
    frozen_version: int | None
    out_dir: Path

    def summary(self) -> dict[str, Any]:
        s = self.run.summary()
        s.update(arm=self.arm.name, label=self.arm.label, startup_s=self.startup_s, elapsed_s=self.elapsed_s,
                 frozen_version=self.frozen_version, produced=self.run.produced)  # fmt: skip
        return s


class LogWatch:
    """Reads a service's log file as it grows."""

    def __init__(self, path: Path | None) -> None:
        self.path, self.pos, self.text = path, 0, ""

    def search(self, pattern: re.Pattern[str]) -> re.Match[str] | None:
        if self.path is not None and self.path.exists():
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                chunk = f.read()
            self.pos += len(chunk)
            self.text = (self.text + chunk.decode(errors="replace"))[-200_000:]
        return pattern.search(self.text)


def _wait_ready(group: ServiceGroup, timeout: float) -> None:
    watches = {s.name: LogWatch(s.log_path) for s in group.services if s.name in READY}
    deadline = time.monotonic() + timeout
    waiting = set(watches)
    while waiting:
        group.check()
        waiting = {n for n in waiting if watches[n].search(READY[n]) is None}
        if not waiting:
            return
        if time.monotonic() > deadline:
            raise StreamrecError(f"{', '.join(sorted(waiting))} not ready within {timeout:.0f} s "
                                 f"(logs in {group.log_dir})")  # fmt: skip
        time.sleep(0.5)


def arm_services(
    settings: KafkaSettings, arm: Arm, cfg: LoopConfig, out_dir: Path, *,
    join: dict[str, Any] | None = None, trainer: dict[str, Any] | None = None,
    serving: dict[str, Any] | None = None,
) -> list[Service]:  # fmt: skip
    """The services of one arm: :func:`harness.pipeline.pipeline_services` with the arm's settings."""
    prefix = settings.topic_prefix
    pcfg = PipelineConfig(
        out_dir=out_dir,
        join={**LOOP_JOIN_SETTINGS, **(join or {})},
        trainer={"group_id": f"{prefix}trainer", **(trainer or {})},
        serving={
            "group_id": f"{prefix}serving",
            "explore": arm.explore,
            "explore_seed": cfg.seed,
            # frozen: nothing learns after the first version, the agent's per-user posterior neither
            # (the other arms take STREAMREC_SERVING_POSTERIOR_REFRESH, on by default)
            **({"posterior_refresh": False} if arm.freeze else {}),
            **(serving or {}),
        },
    )
    services = pipeline_services(settings, pcfg)
    return [s for s in services if arm.trainer or s.name != "trainer"]


def run_arm(
    settings: KafkaSettings, arm: Arm, cfg: LoopConfig, out_dir: Path, *,
    world: LoopWorld | None = None, join: dict[str, Any] | None = None,
    trainer: dict[str, Any] | None = None, serving: dict[str, Any] | None = None,
    ready_timeout_s: float = 300.0,
) -> ArmResult:  # fmt: skip
    """One arm: topics, catalog, services, the loop; the services are stopped when it ends (also on errors)."""
    started = time.monotonic()
    world = world or LoopWorld(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    ensure_topics(settings)
    produce_catalog(
        settings, world
    )  # before the services start: the trainer's first catalog is whole
    services = arm_services(
        settings, arm, cfg, out_dir, join=join, trainer=trainer, serving=serving
    )
    frozen: dict[str, Any] = {"version": None}
    with ServiceGroup(services, log_dir=out_dir / "logs") as group:
        _wait_ready(group, ready_timeout_s)
        startup_s = time.monotonic() - started
        log.info("arm %s: services ready after %.0f s", arm.name, startup_s)
        trainer_svc = next((s for s in group.services if s.name == "trainer"), None)
        watch = LogWatch(trainer_svc.log_path if trainer_svc is not None else None)
        last_look = [0.0]

        def tick() -> None:
            for s in group.services:
                if s is trainer_svc and frozen["version"] is not None:
                    continue  # stopped on purpose
                s.check()
            if arm.freeze and trainer_svc is not None and frozen["version"] is None:
                if time.monotonic() - last_look[0] < 0.25:
                    return
                last_look[0] = time.monotonic()
                m = watch.search(PUBLISHED)
                if m is not None:
                    # SIGKILL, not SIGTERM: a trainer asked to stop finishes its iteration, which may
                    # train and publish one more version (seen in a trial run)
                    frozen["version"] = int(m.group(1))
                    log.info(
                        "arm %s: the trainer published version %s; killing it", arm.name, m.group(1)
                    )
                    trainer_svc.kill()

        run = run_closed_loop(settings, cfg, world=world, catalog_done=True, on_tick=tick,
                              tag=settings.topic_prefix.strip("-") or None,
                              id_namespace=shared_namespace(cfg))  # fmt: skip
    return ArmResult(arm, run, startup_s, time.monotonic() - started, frozen["version"], out_dir)


# --------------------------------------------------------------------------- the report
def comparisons(results: list[ArmResult]) -> dict[str, dict[str, Any]]:
    """Paired click differences of the first arm against each other arm: over all requests, after
    the shift, and from the first request at which both had served a trained version
    (``both_trained``; None when one never did).  The last separates the policies from the
    timing of their first versions, which the guardrail decides and which differs between arms."""
    if len(results) < 2:
        return {}
    base = results[0]
    shift = base.run.shift_index
    out: dict[str, dict[str, Any]] = {}
    for other in results[1:]:
        a, b = base.run.outcomes, other.run.outcomes
        fa, fb = first_trained(a), first_trained(b)
        both = None
        if fa is not None and fb is not None:
            both = paired_difference(a, b, max(fa, fb)) | {"from_request": max(fa, fb)}
        out[f"{base.arm.name} - {other.arm.name}"] = {
            "all": paired_difference(a, b),
            "after_shift": paired_difference(a, b, shift) if shift else None,
            "both_trained": both,
        }
    return out


def format_comparisons(comp: dict[str, dict[str, Any]]) -> str:
    lines = [
        "paired click differences on the same requests (same user, time and random numbers), ± 1 se:"
    ]
    for name, parts in comp.items():
        a = parts["all"]
        text = f"  {name:<24} all {a['difference']:+8.0f} ± {a['se']:.0f}"
        if parts["after_shift"] is not None:
            b = parts["after_shift"]
            text += f"   after the shift {b['difference']:+8.0f} ± {b['se']:.0f}"
        if parts.get("both_trained") is not None:
            c = parts["both_trained"]
            text += f"   both trained (from request {c['from_request']:,}) {c['difference']:+8.0f} ± {c['se']:.0f}"
        lines.append(text)
    return "\n".join(lines)


def targets(
    summaries: dict[str, dict[str, Any]], comp: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """The issue's targets, each with the figure it is judged on and whether it was met."""
    out: dict[str, Any] = {}
    ex = summaries.get("explore")
    if ex is None:
        return out
    steady = ex["before_last_window"]["ratio"]
    out["explore_before_shift_ge_90pct"] = {
        "value": steady, "whole_phase": ex["before"]["ratio"], "met": bool(steady >= BEFORE_TARGET),
        "judged_on": f"the last {ex['window']} requests before the shift",
    }  # fmt: skip
    if ex["shift_index"] is not None:
        rec = ex["recovery_requests"]
        out["explore_recovers_to_85pct"] = {"requests": rec, "met": rec is not None,
                                            "judged_on": "trailing window of realised clicks"}  # fmt: skip

    def beats(other: str) -> dict[str, Any] | None:
        c = comp.get(f"explore - {other}")
        if c is None:
            return None
        d = c["all"]
        return {
            "difference": d["difference"],
            "se": d["se"],
            "met": bool(d["difference"] > 2 * d["se"]),
        }

    for other in ("frozen", "popularity"):
        b = beats(other)
        if b is not None:
            out[f"explore_beats_{other}_clearly"] = {
                **b,
                "judged_on": "paired clicks, all requests, > 2 se",
            }
    c = comp.get("explore - greedy")
    if c is not None:
        d = c["all"]
        out["explore_cumulative_above_greedy"] = {"difference": d["difference"], "se": d["se"],
                                                  "met": bool(d["difference"] > 0),
                                                  "beyond_2se": bool(d["difference"] > 2 * d["se"])}  # fmt: skip
        both = c.get("both_trained")
        if both is not None:  # for reading only: the target is judged on the whole run
            out["explore_cumulative_above_greedy"] |= {"both_trained_difference": both["difference"],
                                                       "both_trained_se": both["se"]}  # fmt: skip
    return out


def format_targets(t: dict[str, Any]) -> str:
    lines = ["targets (issue 13 item 4):"]
    for name, v in t.items():
        ok = "MET" if v["met"] else "NOT MET"
        detail = ", ".join(f"{k}={_short(x)}" for k, x in v.items() if k != "met")
        lines.append(f"  {name:<34} {ok:<8} {detail}")
    return "\n".join(lines)


def _short(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.3f}" if abs(x) < 10 else f"{x:.0f}"
    return str(x)


def plot(results: list[ArmResult], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 8), sharex=True)
    shift = results[0].run.shift_index
    for r in results:
        outs = r.run.outcomes
        w = r.run.config.window
        clicks = np.array([o.clicks for o in outs], dtype=float)
        opt = np.array([o.optimal for o in outs])
        x = np.arange(1, len(outs) + 1)
        ax1.plot(x, trailing_ratio(clicks, opt, w), label=r.arm.label)
        ax2.plot(x, np.cumsum(opt - clicks), label=r.arm.label)
    for ax in (ax1, ax2):
        if shift is not None:
            ax.axvline(shift, color="grey", linestyle="--", linewidth=1)
        ax.grid(alpha=0.3)
    ax1.axhline(BEFORE_TARGET, color="black", linestyle=":", linewidth=1)
    ax1.axhline(RECOVER_TARGET, color="black", linestyle="-.", linewidth=1)
    ax1.set_ylabel(f"click rate / optimal (trailing {results[0].run.config.window} requests)")
    ax1.set_ylim(0, 1.1)
    ax1.legend(loc="lower right")
    ax2.set_ylabel("cumulative regret (clicks)")
    ax2.set_xlabel("requests (dashed: interest shift)")
    fig.suptitle("streamrec closed loop: realised clicks against the optimal policy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m harness.loop",
        description="The closed loop (simulated users with known click probabilities) for four arms, "
        "each a pipeline of its own on one broker: continual + exploration, continual greedy, a frozen first "
        "version, popularity. Prints per-window click rate / optimal, a summary, the targets, a JSON last line.",
    )
    add_simulate_arguments(parser)
    parser.add_argument("--arms", default="explore,greedy,frozen,popularity",
                        help="comma list of arms to run, in order (default all four)")  # fmt: skip
    parser.add_argument("--explore", default="epsilon", choices=["epsilon", "softmax"],
                        help="exploration of the explore arm (default epsilon, at the agent's default epsilon)")  # fmt: skip
    parser.add_argument("--join-window-ms", type=int, default=LOOP_JOIN_SETTINGS["window_ms"],
                        help="the join's attribution window in event time (default 30000)")  # fmt: skip
    parser.add_argument(
        "--ready-timeout", type=float, default=300.0, help="longest wait for the services (s)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="run folder (default .cache/loop/<run>)"
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger(LIBRDKAFKA_LOGGER).setLevel(logging.CRITICAL)
    try:
        return _run(args)
    except (ConfigError, StreamrecError, BrokerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: stopped cleanly", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    cfg = loop_config(args)
    by_name = {a.name: a for a in default_arms(args.explore)}
    wanted = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in wanted if a not in by_name]
    if unknown or not wanted:
        raise ConfigError("--arms", f"unknown arm(s) {unknown}; choose from {', '.join(by_name)}")
    arms = [by_name[a] for a in wanted]
    world = LoopWorld(cfg)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base_prefix = os.environ.get("STREAMREC_TOPIC_PREFIX") or f"loop-{stamp}-"
    out_root = args.out or default_cache_dir() / "loop" / f"loop-{stamp}"
    out_root.mkdir(parents=True, exist_ok=True)
    results: list[ArmResult] = []
    with broker_for_demo() as broker:
        print(f"broker: {broker.describe()}")
        print(f"world: {cfg.users} users, {cfg.items} items + {cfg.new_items} arriving, {cfg.requests:,} requests "
              f"of k={cfg.k} at {cfg.rate or 'max'} req/s, shift at request {world.shift_index} "
              f"({cfg.shift_fraction:.0%} of users re-drawn), position bias {cfg.position_bias:g}; "
              f"optimal {world.optimal().mean():.2f} clicks/request; run folder {out_root}")  # fmt: skip
        for arm in arms:
            settings = load(
                KafkaSettings,
                bootstrap_servers=broker.bootstrap,
                topic_prefix=f"{base_prefix}{arm.name}-",
            )
            print(f"arm {arm.name} ({arm.label}): topics {settings.topic_prefix}*", flush=True)
            res = run_arm(settings, arm, cfg, out_root / arm.name, world=world,
                          join={"window_ms": args.join_window_ms}, ready_timeout_s=args.ready_timeout)  # fmt: skip
            s = res.summary()
            print(f"  done in {res.elapsed_s:.0f} s (services ready after {res.startup_s:.0f} s, loop "
                  f"{res.run.elapsed_s:.0f} s): {s['cumulative']['clicks']:,} clicks of "
                  f"{s['cumulative']['optimal']:,.0f} optimal; versions {_versions(s['versions_served'])}"
                  + (f"; frozen at version {res.frozen_version}" if res.frozen_version else ""), flush=True)  # fmt: skip
            results.append(res)
    summaries = {r.arm.name: r.summary() for r in results}
    comp = comparisons(results)
    tgt = targets(summaries, comp)
    print()
    print(
        f"== closed loop: click rate / optimal per window of {cfg.window} requests: realised (expected) =="
    )
    print(format_windows({r.arm.label: r.run.windows() for r in results}))
    print()
    print(format_summary({r.arm.label: summaries[r.arm.name] for r in results}))
    print()
    print(format_comparisons(comp))
    print()
    print(format_targets(tgt))
    png: Path | None = None
    try:
        png = plot(results, out_root / "loop.png")
        print(f"plot: {png}")
    except Exception:  # the numbers are the result; a plotting failure must not hide them
        log.exception("writing the plot failed")
    elapsed = time.monotonic() - started
    record = {"config": cfg.__dict__, "arms": summaries, "comparisons": comp, "targets": tgt,
              "plot": str(png) if png else None, "out_dir": str(out_root), "elapsed_s": elapsed}  # fmt: skip
    windows = {r.arm.name: [w.__dict__ for w in r.run.windows()] for r in results}
    (out_root / "loop.json").write_text(
        json.dumps(json.loads(json_line({**record, "windows": windows})), indent=1)
    )
    print(f"done in {elapsed:.0f} s")
    print(json_line(record))
    return 0


def _versions(vs: list[str]) -> str:
    return ", ".join(vs) if len(vs) <= 4 else f"{vs[0]}, {vs[1]}, ..., {vs[-1]} ({len(vs)})"


if __name__ == "__main__":
    sys.exit(main())
