"""Prometheus counters of the scoring agent, in their own registry.

Each agent owns a :class:`ServingMetrics` (not the process-global registry), so
several agents can run in one process (tests, benchmarks) without clashing;
:meth:`ServingMetrics.serve` exposes it over HTTP on ``metrics_port``.

Exported (prefix ``streamrec_serving_``):

* ``requests_total{path}`` — requests answered; path = ``model`` (live model),
  ``cold`` (new user: popularity blended with text similarity), ``fallback``
  (no model yet, or none of the candidates known), ``query`` (a request with a
  free-text query, ranked by it alone: a new user, or no model yet),
  ``query_model`` (a query blended with the live model for a user with history).
* ``latency_seconds`` — from the request's arrival at the agent to its
  recommendation being handed to the producer.
* ``batch_size`` — requests per micro-batch.
* ``model_version`` — the live version (0 = the popularity fallback).
* ``swaps_total``, ``swap_seconds`` — completed swaps and their load+build+encode time.
* ``refused_versions_total{reason}`` — versions not swapped in (checksum,
  truncated, config, error, ...); the old version kept serving.
* ``dead_letters_total{reason}`` — inputs sent to dead-letters: ``invalid_request``,
  ``invalid_state_record``, ``scoring_failed``, ``answer_too_large`` (the
  recommendation was too large to deliver, e.g. a huge ``k``), ``answer_rejected``.
* ``unknown_candidates_total`` — candidate ids not in the catalog (skipped).
* ``produce_errors_total`` — outputs the broker did not accept (logged).
* ``catalog_items``, ``items_encoded_total`` — catalog size and item vectors computed.
* ``assigned_partitions`` — ``rec-requests`` partitions this agent owns in its group.
* ``posterior_examples_total``, ``posterior_users``, ``posterior_seconds`` — labeled examples
  the agent's own per-user posterior learned (:mod:`serving.refresh`), users it holds, and the
  time of each refresh; ``posterior_skipped_total{reason}`` — examples it did not learn
  (``duplicate``, ``unknown_item``, ``invalid_record``, ``pending_full``).
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
_SWAP_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class ServingMetrics:
    """Every counter of one agent."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r, p = self.registry, "streamrec_serving_"
        self.requests = Counter(f"{p}requests", "Requests answered, by scoring path.", ["path"], registry=r)
        self.latency = Histogram(
            f"{p}latency_seconds", "Arrival at the agent to recommendation produced.",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.batch_size = Histogram(
            f"{p}batch_size", "Requests per scoring micro-batch.", buckets=_BATCH_BUCKETS, registry=r
        )
        self.model_version = Gauge(
            f"{p}model_version", "Live model version (0 = popularity fallback).", registry=r
        )
        self.swaps = Counter(f"{p}swaps", "Model versions swapped in.", registry=r)
        self.swap_seconds = Histogram(
            f"{p}swap_seconds", "Load, verify, build and item-vector time of a swap.",
            buckets=_SWAP_BUCKETS, registry=r,
        )
        self.refused = Counter(
            f"{p}refused_versions", "Model versions refused (old version kept).", ["reason"], registry=r
        )
        self.dead_letters = Counter(
            f"{p}dead_letters", "Inputs sent to dead-letters.", ["reason"], registry=r
        )
        self.unknown_candidates = Counter(
            f"{p}unknown_candidates", "Candidate item ids not in the catalog (skipped).", registry=r
        )
        self.produce_errors = Counter(
            f"{p}produce_errors", "Recommendations or dead letters the broker did not accept.", registry=r
        )
        self.catalog_items = Gauge(f"{p}catalog_items", "Items in the catalog.", registry=r)
        self.assigned_partitions = Gauge(
            f"{p}assigned_partitions", "rec-requests partitions this agent owns in its group.", registry=r
        )
        self.items_encoded = Counter(
            f"{p}items_encoded", "Item vectors computed by the item tower.", registry=r
        )
        self.posterior_examples = Counter(
            f"{p}posterior_examples", "Labeled examples learned by the agent's per-user posterior.", registry=r
        )
        self.posterior_skipped = Counter(
            f"{p}posterior_skipped", "Labeled examples the per-user posterior did not learn.", ["reason"], registry=r
        )
        self.posterior_users = Gauge(f"{p}posterior_users", "Users in the agent's per-user posterior.", registry=r)
        self.posterior_seconds = Histogram(
            f"{p}posterior_seconds", "Time of one refresh of the per-user posterior.",
            buckets=_LATENCY_BUCKETS, registry=r,
        )

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Current value of one sample (``0.0`` when absent), e.g. ``value("swaps_total")``."""
        got = self.registry.get_sample_value(f"streamrec_serving_{name}", labels or {})
        return 0.0 if got is None else float(got)

    def serve(self, port: int) -> None:
        """Expose ``/metrics`` on ``port`` (all interfaces) in a daemon thread."""
        start_http_server(port, registry=self.registry)
        log.info("metrics on :%d/metrics", port)
