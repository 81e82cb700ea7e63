"""The trainer service's Prometheus metrics, and the plain counts its progress line and tests read.

Every label is a fixed set: a guardrail :class:`~trainer.guardrail.Refusal`, a
:class:`~trainer.weights.WeightsReason` (never an error's wording), a version
kind, a topic, a scope.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from trainer.guardrail import Refusal
from trainer.metrics import finite
from trainer.weights import WeightsReason

PREFIX = "streamrec_trainer_"
IO_ERROR = "io"
"""The ``reason`` of a publish failure that is a storage error, not a :class:`WeightsError`."""


class TrainerMetrics:
    """Prometheus metrics of one trainer (own registry, so tests can run several)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        p = PREFIX
        self.consumed = Counter(p + "examples_consumed", "Labeled records taken off the topic", registry=r)
        self.trained = Counter(p + "examples_trained", "Examples trained on", registry=r)
        self.held_back = Counter(p + "examples_held_back", "Examples held back for the guardrail", registry=r)
        self.duplicates = Counter(p + "duplicates_dropped", "Redelivered example_ids dropped", registry=r)
        self.steps = Counter(p + "steps", "Training steps", registry=r)
        self.published = Counter(p + "versions_published", "Versions published", ["kind"], registry=r)
        self.rejections = Counter(p + "guardrail_rejections", "Candidates the guardrail refused, by reason",
                                  ["reason"], registry=r)
        for reason in Refusal:
            self.rejections.labels(reason=reason.value)
        self.published_bytes = Counter(p + "published_bytes", "Bytes of weights written to the store",
                                       ["kind"], registry=r)
        self.publish_failures = Counter(p + "publish_failures", "Versions the store could not take, by reason",
                                        ["reason"], registry=r)
        for code in [*WeightsReason, IO_ERROR]:
            self.publish_failures.labels(reason=str(code))
        self.announce_failures = Counter(p + "announce_failures", "Announcements on model-updates that were "
                                         "not delivered (retried at the next publish attempt)", registry=r)
        self.orphans = Counter(p + "orphan_versions_removed", "Versions in the store no checkpoint descends "
                               "from, removed at start-up", registry=r)
        self.unannounced = Gauge(p + "unannounced_version", "Newest published version whose announcement "
                                 "failed and awaits its retry (0 = none)", registry=r)
        self.dead_letters = Counter(p + "dead_letters", "Records sent to dead-letters", ["topic"], registry=r)
        self.dead_letter_failures = Counter(p + "dead_letter_failures", "Dead letters that were not delivered",
                                            registry=r)
        self.items = Counter(p + "items_consumed", "Item records read into the catalog", registry=r)
        self.loss = Gauge(p + "last_step_loss", "Total loss of the last step", registry=r)
        self.auc = Gauge(p + "prequential_auc", "Prequential (test-then-train) AUC over the recent "
                         "window or since the start", ["scope"], registry=r)
        self.live_version = Gauge(p + "live_version", "Newest published version", registry=r)
        self.lag = Gauge(p + "lag", "Labeled records not yet trained (all partitions)", registry=r)
        self.catalog = Gauge(p + "catalog_items", "Items in the catalog", registry=r)
        self.posterior_users = Gauge(p + "posterior_users", "Users (hashed rows) the per-user posterior holds",
                                     registry=r)
        self.posterior_changes = Gauge(p + "posterior_changes", "Expected change points of users' tastes the "
                                       "per-user posterior detected so far (posterior_change_hazard)", registry=r)
        self.item_bias_prior_std = Gauge(p + "item_bias_prior_std", "Prior std of the item-id biases' posterior "
                                         "that the evidence chose (item_bias_prior_stds)", registry=r)
        self.step_seconds = Histogram(
            p + "step_seconds", "Duration of one training step",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r,
        )
        self.counts = {"trained": 0, "held_back": 0, "duplicates": 0, "dead": 0, "consumed": 0,
                       "announce_failures": 0, "orphan_versions_removed": 0}
        """The same counts as plain numbers (for :meth:`TrainerService.progress` and the progress log)."""
        self.refusals = {reason.value: 0 for reason in Refusal}

    # --- one place per event ------------------------------------------------------------
    def taken(self, consumed: int, duplicates: int, held_back: int) -> None:
        """Records taken off the feed: all of them, the redelivered ones dropped, those held back."""
        self.consumed.inc(consumed)
        self.duplicates.inc(duplicates)
        self.held_back.inc(held_back)
        self.counts["consumed"] += consumed
        self.counts["duplicates"] += duplicates
        self.counts["held_back"] += held_back

    def stepped(self, trained: int, seconds: float, result: dict[str, Any], prequential: dict[str, float]) -> None:
        """One training step on ``trained`` examples."""
        self.step_seconds.observe(seconds)
        self.steps.inc()
        self.trained.inc(trained)
        self.counts["trained"] += trained
        loss = result.get("loss")
        if finite(loss):
            self.loss.set(float(loss))  # type: ignore[arg-type]
        gauges = (("posterior_users", self.posterior_users), ("posterior_changes", self.posterior_changes),
                  ("item_bias_prior_std", self.item_bias_prior_std))
        for name, gauge in gauges:
            if finite(result.get(name)):
                gauge.set(float(result[name]))
        for scope in ("window", "cumulative"):
            auc = prequential.get(f"{scope}_auc")
            if finite(auc):
                self.auc.labels(scope=scope).set(float(auc))  # type: ignore[arg-type]

    def dead_lettered(self, topic: str) -> None:
        self.dead_letters.labels(topic=topic).inc()
        self.counts["dead"] += 1

    def refused(self, reason: Refusal) -> None:
        self.rejections.labels(reason=reason.value).inc()
        self.refusals[reason.value] += 1

    def orphans_removed(self, n: int) -> None:
        if n:
            self.orphans.inc(n)
            self.counts["orphan_versions_removed"] += n

    def announce_failed(self, version: int) -> None:
        self.announce_failures.inc()
        self.counts["announce_failures"] += 1
        self.unannounced.set(version)
