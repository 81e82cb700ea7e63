"""Prometheus counters of the join worker, in a registry of their own.

Each :class:`JoinMetrics` owns a :class:`~prometheus_client.CollectorRegistry`,
so several apps in one process (tests) never clash; :meth:`JoinMetrics.serve`
exposes it over HTTP (``/metrics``) on the worker's ``metrics_port``.

Names (all prefixed ``streamrec_join_``):

=================================  =========  ======================================================
``events_in_total{topic}``         counter    records read per logical input topic
``labeled_total{label}``           counter    examples emitted, ``positive`` / ``negative``
``late_positives_total``           counter    positives emitted after their negative
``orphan_clicks_total``            counter    early clicks whose impression never came
``dead_letters_total{reason}``     counter    records sent to dead-letters: ``malformed``, ``orphan``, ``invalid``,
                                             ``too_large`` (an output or state record too large to deliver)
``duplicates_total{kind}``         counter    repeated impressions / clicks that changed nothing
``behind_watermark_total{kind}``   counter    impressions / clicks / early clicks a window behind the watermark
``user_history_updates_total``     counter    user-history records emitted
``replayed_skipped_total``         counter    redelivered inputs the restored state already held
``input_gaps_total``               counter    holes in the delivered offsets, re-read from the state's offset
``stale_skipped_total``            counter    events fetched before such a re-read (they come again)
``deferred_total``                 counter    events delivered while rebalancing (re-read after it)
``pending_impressions{partition}`` gauge      impressions whose window is open
``remembered_impressions{...}``    gauge      open + closed-but-retained impressions
``early_clicks{partition}``        gauge      clicks waiting for their impression
``watermark_ms{partition}``        gauge      partition watermark (event time)
``watermark_lag_ms{partition}``    gauge      newest event ts seen − watermark
``batch_seconds``                  histogram  time to process, emit and persist one batch
=================================  =========  ======================================================
"""

from __future__ import annotations

import contextlib
import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

PREFIX = "streamrec_join_"


class JoinMetrics:
    """The join's counters and gauges; cheap to update from the event loop."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.events_in = Counter(f"{PREFIX}events_in", "Records read per input topic.", ["topic"], registry=r)
        self.labeled = Counter(f"{PREFIX}labeled", "Labeled examples emitted.", ["label"], registry=r)
        self.late_positives = Counter(
            f"{PREFIX}late_positives", "Positives emitted after their negative (late=true).", registry=r
        )
        self.orphans = Counter(
            f"{PREFIX}orphan_clicks", "Clicks whose impression did not come within the grace.", registry=r
        )
        self.dead_letters = Counter(
            f"{PREFIX}dead_letters", "Records sent to dead-letters, by reason.", ["reason"], registry=r
        )
        self.duplicates = Counter(
            f"{PREFIX}duplicates", "Repeated records that changed nothing.", ["kind"], registry=r
        )
        self.behind_watermark = Counter(
            f"{PREFIX}behind_watermark",
            "Events that arrived behind the watermark by more than the window (backfills), by kind.",
            ["kind"],
            registry=r,
        )
        self.replayed = Counter(
            f"{PREFIX}replayed_skipped",
            "Inputs redelivered after a restart or rebalance that the state already held.",
            registry=r,
        )
        self.input_gaps = Counter(
            f"{PREFIX}input_gaps",
            "Holes in the delivered input offsets (events skipped upstream), re-read from the state's offset.",
            registry=r,
        )
        self.stale = Counter(
            f"{PREFIX}stale_skipped", "Events fetched before a re-read; they are delivered again.", registry=r
        )
        self.deferred = Counter(
            f"{PREFIX}deferred", "Events delivered while rebalancing; re-read after it.", registry=r
        )
        self.history_updates = Counter(
            f"{PREFIX}user_history_updates", "user-history records emitted.", registry=r
        )
        self.pending = Gauge(
            f"{PREFIX}pending_impressions", "Impressions whose window is open.", ["partition"], registry=r
        )
        self.remembered = Gauge(
            f"{PREFIX}remembered_impressions",
            "Impressions in memory (open, or closed and retained).",
            ["partition"],
            registry=r,
        )
        self.early_clicks = Gauge(
            f"{PREFIX}early_clicks", "Clicks waiting for their impression.", ["partition"], registry=r
        )
        self.watermark = Gauge(
            f"{PREFIX}watermark_ms", "Partition watermark (event-time ms).", ["partition"], registry=r
        )
        self.watermark_lag = Gauge(
            f"{PREFIX}watermark_lag_ms",
            "Newest event ts seen minus the partition watermark (ms).",
            ["partition"],
            registry=r,
        )
        self.batch_seconds = Histogram(
            f"{PREFIX}batch_seconds",
            "Seconds to process, emit and persist one batch.",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        for label in ("positive", "negative"):
            self.labeled.labels(label=label)
        for reason in ("malformed", "orphan", "invalid", "too_large"):
            self.dead_letters.labels(reason=reason)

    def forget_partition(self, partition: int) -> None:
        """Drop the per-partition gauges of a partition this worker no longer owns."""
        for gauge in (self.pending, self.remembered, self.early_clicks, self.watermark, self.watermark_lag):
            with contextlib.suppress(KeyError):
                gauge.remove(str(partition))

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        """Expose ``/metrics`` over HTTP on ``port`` (0 = do nothing)."""
        if port:
            start_http_server(port, addr=addr, registry=self.registry)
            log.info("Prometheus metrics on http://%s:%d/metrics", addr, port)
