"""The loader thread: the only writer of the live snapshot (see :mod:`serving.snapshot`).

:class:`ModelLoader` runs in a background thread and:

* on a new :class:`~contract.records.ModelUpdate` (newer than the live version,
  same model name): fetches the snapshot with
  :meth:`trainer.weights.WeightStore.load` (full, or delta applied to its base
  chain; sha256 and size verified, the model rebuilt from the manifest's
  config), computes the vectors of the whole catalog with the new item tower,
  checks they are finite, and swaps.  Only the agent's own store is trusted:
  an announcement whose ``uri`` is not that store's manifest of its version
  (another scheme or root, ``..``, a symlink out) is refused as ``foreign``
  before anything is read, reads are size-capped (``size``), the manifest's
  config is bound-checked (``config``) and its encoder must be the offline
  default or a local folder in the store or cache (``foreign``); with a
  signing key (``STREAMREC_SERVING_SIGNING_KEY``) an unsigned or wrongly
  signed manifest is refused (``signature``).  A version that fails any step
  is *refused*: the reason is logged and counted
  (``refused_versions_total{reason}``) and the old snapshot keeps serving;
* on catalog changes (new items, changed texts, tombstones): computes the
  vectors of just those items with the live model, in batches, and swaps in
  an extended snapshot, so a new item is scorable as soon as its vector is
  (zero-shot, from its text).  Without a model the snapshot still lists the
  catalog, for the popularity fallback.

Swap cost is mostly the item vectors (the whole catalog through the item
tower).  It is kept down three ways: texts are encoded shortest-first in large
calls (little padding); when the model freezes its lower encoder layers
(``freeze_layers``) one :class:`trainer.prefix_cache.PrefixCache` is kept across
versions, so a swap re-runs only the trainable layers; and a version whose
item tower equals the live one (only the user tower or heads changed) reuses
the live vectors.  The loader thread runs at a lower priority
(``loader_nice``), so scoring preempts it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from contract.records import ModelUpdate
from serving.metrics import ServingMetrics
from serving.snapshot import (
    ModelHolder,
    ServingModel,
    apply_item_changes,
    check_finite,
    encode_entries,
    fallback_snapshot,
    model_snapshot,
    same_item_tower,
)
from serving.state import CatalogState
from trainer.catalog import CatalogEntry
from trainer.prefix_cache import PrefixCache
from trainer.weights import WeightsError, WeightStore

if TYPE_CHECKING:
    from trainer.model import RecModel
    from trainer.model_config import ModelConfig

log = logging.getLogger(__name__)


def refusal_reason(exc: BaseException) -> str:
    """A short label for ``refused_versions_total{reason}``: the error's stable reason code."""
    if not isinstance(exc, WeightsError):
        return "error"
    return exc.reason.value


class ModelLoader:
    """The background thread that loads versions and keeps item vectors current (see module doc)."""

    def __init__(
        self,
        *,
        holder: ModelHolder,
        catalog: CatalogState,
        store: WeightStore,
        metrics: ServingMetrics,
        model_name: str,
        device: str | torch.device = "cpu",
        encode_batch: int = 256,
        prefix_cache_items: int = 20_000,
        nice: int = 0,
        fallback_version: str,
        warm_config: ModelConfig | None = None,
    ) -> None:
        self.holder = holder
        self.catalog = catalog
        self.store = store
        self.metrics = metrics
        self.model_name = model_name
        self.device = device
        self.encode_batch = encode_batch
        self.nice = nice
        self.fallback_version = fallback_version
        self.warm_config = warm_config
        self._prefix_cache: PrefixCache | None = None
        self._prefix_cache_items = prefix_cache_items
        self._updates: deque[ModelUpdate] = deque()
        self._wake = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.refused: list[tuple[int, str]] = []
        self._attempts = threading.Condition()
        catalog.wakeup = self._notify

    # --- feeding -----------------------------------------------------------------------
    def announce(self, update: ModelUpdate) -> None:
        """Queue a model-updates record (called from the consuming thread)."""
        with self._wake:
            self._updates.append(update)
            self._wake.notify()

    def _notify(self) -> None:
        with self._wake:
            self._wake.notify()

    def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Block until ``predicate()`` holds after some version was swapped in or refused."""
        with self._attempts:
            return self._attempts.wait_for(predicate, timeout=timeout)

    def _attempted(self) -> None:
        with self._attempts:
            self._attempts.notify_all()

    # --- start-up ------------------------------------------------------------------------
    def load_initial(self, announced: ModelUpdate | None) -> ServingModel:
        """Load the newest valid version (announced first, else the store's), or the fallback; swap it in."""
        tried: set[int] = set()
        if announced is not None and announced.model == self.model_name:
            tried.add(announced.version)
            if self._try_swap(announced):
                return self.holder.current
        try:
            update = self.store.latest_valid()
        except (WeightsError, OSError) as exc:
            log.warning("cannot list the weight store %s: %s", self.store.url, exc)
            update = None
        fresh = update is not None and update.model == self.model_name and update.version not in tried
        if fresh and self._try_swap(update):  # type: ignore[arg-type]
            return self.holder.current
        entries = self.catalog.entries()
        self.holder.swap(fallback_snapshot(self.fallback_version, entries))
        self.metrics.model_version.set(0)
        self.metrics.catalog_items.set(len(entries))
        log.warning(
            "no valid model version yet: serving %s over %d catalog items", self.fallback_version, len(entries)
        )
        return self.holder.current

    # --- the thread ----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="serving-loader", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        if self.nice > 0 and hasattr(os, "setpriority"):
            try:  # Linux: per-thread; scoring and the Kafka threads preempt version loading
                tid = threading.get_native_id()
                os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + self.nice))
            except OSError as exc:
                log.info("could not lower the loader thread's priority: %s", exc)
        if self.warm_config is not None and self.holder.current.model is None:
            self.warm_up(self.warm_config)
        while not self._stop.is_set():
            with self._wake:
                self._wake.wait_for(
                    lambda: self._stop.is_set() or bool(self._updates) or self.catalog.has_changes(),
                    timeout=1.0,
                )
                updates = list(self._updates)
                self._updates.clear()
            try:
                # Newest first: versions announced while another loaded are superseded, not loaded
                # in turn; an older one is tried only when the newer ones are refused.
                for n, update in enumerate(sorted(updates, key=lambda u: u.version, reverse=True)):
                    if self._try_swap(update):
                        if n + 1 < len(updates):
                            log.info("version %d supersedes %d queued older announcement(s)",
                                     update.version, len(updates) - n - 1)
                        break
                if self.catalog.has_changes():
                    self.refresh_items()
            except Exception:  # never let the loader die: the old snapshot keeps serving
                log.exception("serving loader step failed; the live snapshot keeps serving")

    # --- steps -----------------------------------------------------------------------------------
    def _try_swap(self, update: ModelUpdate) -> bool:
        """Load, verify, build, encode and swap one version; False (refused or skipped) otherwise."""
        try:
            return self._swap(update)
        finally:
            self._attempted()

    def _swap(self, update: ModelUpdate) -> bool:
        if update.model != self.model_name:
            log.debug("ignoring model-updates for model %r", update.model)
            return False
        live = self.holder.current.number
        if live is not None and update.version <= live:
            log.info("version %d is not newer than the live %d: skipped", update.version, live)
            return False
        started = time.monotonic()
        live_sm = self.holder.current
        try:
            model = self.store.load(update, device=self.device)
            self._attach_prefix_cache(model)
            loaded = time.monotonic()
            if live_sm.model is not None and live_sm.item_vecs is not None and same_item_tower(live_sm.model, model):
                # Only the user tower / heads changed: the live item vectors are this version's too.
                sm = replace(live_sm, version=str(update.version), number=update.version, model=model,
                             created=time.monotonic(), source_offsets=dict(update.source_offsets))
                encoded = 0
            else:
                entries = self.catalog.entries()
                vecs = encode_entries(model, entries, batch=self.encode_batch)
                sm = model_snapshot(update.version, model, entries, vecs, update.source_offsets)
                encoded = len(entries)
            check_finite(sm)
        except Exception as exc:
            reason = refusal_reason(exc)
            self.metrics.refused.labels(reason=reason).inc()
            self.refused.append((update.version, reason))
            live_name = self.holder.current.version
            if isinstance(exc, WeightsError):
                log.warning("refused model version %d (%s): %s; still serving %s", update.version, reason, exc, live_name)
            else:
                log.exception("refused model version %d (%s); still serving %s", update.version, reason, live_name)
            return False
        old = self.holder.swap(sm)
        done = time.monotonic()
        seconds = done - started
        self.metrics.swaps.inc()
        self.metrics.swap_seconds.observe(seconds)
        self.metrics.model_version.set(update.version)
        self.metrics.items_encoded.inc(encoded)
        self.metrics.catalog_items.set(len(sm))
        log.info(
            "swapped in model version %d (%s%s) in %.2f s (fetch+verify+build %.2f s, %d item vectors "
            "computed in %.2f s%s); was %s",
            update.version, update.kind,
            f" on {update.base_version}" if update.base_version else "",
            seconds, loaded - started, encoded, done - loaded,
            ", item tower unchanged: vectors reused" if encoded == 0 and len(sm) else "",
            old.version,
        )
        return True

    def warm_up(self, config: ModelConfig) -> bool:
        """Before the first version: build a model of ``config`` once and encode the catalog with it, then
        drop it.  The first version's build then finds the libraries imported and the encoder's weights
        read, and, when its frozen encoder prefix is this one's (same encoder, layers, freezing), the
        catalog's prefix states in the cache, so only its own layers run.  A failure is logged, not
        raised: the first version loads the slow way.  Returns whether it warmed."""
        from trainer.model import build_model

        started = time.monotonic()
        try:
            model = build_model(config)
            self._attach_prefix_cache(model)
            entries = self.catalog.entries()
            encode_entries(model, entries, batch=self.encode_batch)
        except Exception:
            log.exception("warming the model builder failed; the first version loads without it")
            return False
        log.info("warmed the model builder in %.2f s (%d catalog items' encoder states cached)",
                 time.monotonic() - started, len(entries) if self._prefix_cache is not None else 0)
        return True

    def _attach_prefix_cache(self, model: RecModel) -> None:
        if self._prefix_cache_items <= 0 or model.item_tower.frozen == 0:
            return
        if self._prefix_cache is None:
            self._prefix_cache = PrefixCache(self._prefix_cache_items)
        model.attach_cache(self._prefix_cache)

    def refresh_items(self) -> int:
        """Apply pending catalog changes to the live snapshot; return how many items were encoded."""
        changes = self.catalog.take_changes()
        if not changes:
            return 0
        sm = self.holder.current
        encoded = 0

        def encode(entries: Sequence[tuple[str, CatalogEntry]]) -> torch.Tensor:
            nonlocal encoded
            assert sm.model is not None
            encoded += len(entries)
            return encode_entries(sm.model, entries, batch=self.encode_batch)

        new = apply_item_changes(sm, changes, encode if sm.model is not None else None)
        if new is None:
            return 0
        if new.item_vecs is not None and not bool(torch.isfinite(new.item_vecs).all()):
            log.error("new item vectors are not finite under version %s; keeping the catalog as it was", sm.version)
            return 0
        self.holder.swap(new)
        self.metrics.items_encoded.inc(encoded)
        self.metrics.catalog_items.set(len(new))
        log.debug("catalog: %d change(s) applied, %d item vector(s) computed, %d items", len(changes), encoded, len(new))
        return encoded
