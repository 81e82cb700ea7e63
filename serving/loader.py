"""Model versions and item vectors for serving: load, verify, build, and swap one reference.

What requests see is a :class:`ServingModel`: an immutable snapshot of a
model, the vectors of every catalog item under that model, the item index and
the version.  :class:`ModelHolder` holds the current snapshot; replacing it is
one attribute assignment, so a micro-batch that has read ``holder.current``
finishes on that snapshot while the next one gets the new one, and no request
ever waits for a swap.

:class:`ModelLoader` is the only writer.  It runs in a background thread and:

* on a new :class:`~contract.records.ModelUpdate` (newer than the live version,
  same model name): fetches the snapshot with
  :meth:`trainer.weights.WeightStore.load` (full, or delta applied to its base
  chain; sha256 and size verified, the model rebuilt from the manifest's
  config), computes the vectors of the whole catalog with the new item tower,
  checks they are finite, and swaps.  A version that fails any step is
  *refused*: the reason is logged and counted
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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch

from contract.records import Item, ModelUpdate
from serving.metrics import ServingMetrics
from trainer.catalog import Catalog, CatalogEntry
from trainer.weights import WeightsError, WeightStore

if TYPE_CHECKING:
    from trainer.model import RecModel

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the snapshot
@dataclass(frozen=True, eq=False)
class ServingModel:
    """Everything one micro-batch needs, never mutated after construction."""

    version: str
    """``model_version`` of its recommendations: the published version number, or the fallback's name."""
    number: int | None
    """The published version, None for the fallback."""
    model: RecModel | None
    item_ids: tuple[str, ...]
    index: Mapping[str, int]
    """item_id -> row of ``item_vecs`` / position in ``item_ids`` (a plain dict for lookup speed;
    like everything here, never mutated once the snapshot is built)."""
    item_vecs: torch.Tensor | None
    """``[len(item_ids), d]`` on the serving device; None for the fallback."""
    text_hashes: tuple[str, ...]
    created: float = field(default_factory=time.monotonic)

    def __len__(self) -> int:
        return len(self.item_ids)


def fallback_snapshot(version: str, entries: Sequence[tuple[str, CatalogEntry]]) -> ServingModel:
    """A model-less snapshot that lists the catalog (for the popularity fallback)."""
    ids = tuple(i for i, _ in entries)
    return ServingModel(
        version=version,
        number=None,
        model=None,
        item_ids=ids,
        index={i: r for r, i in enumerate(ids)},
        item_vecs=None,
        text_hashes=tuple(e.text_hash for _, e in entries),
    )


def encode_entries(
    model: RecModel, entries: Sequence[tuple[str, CatalogEntry]], *, batch: int
) -> torch.Tensor:
    """Item vectors ``[n, d]`` of catalog entries, in their order.

    Texts go to the item tower ``batch`` at a time, shortest first, so each
    call pads little (chunks of mixed lengths measured 2.7x slower).
    """
    dev = model.item_tower.proj.weight.device
    if not entries:
        return torch.zeros((0, model.vector_width), device=dev)
    order = sorted(range(len(entries)), key=lambda r: len(entries[r][1].text))
    parts = []
    with torch.inference_mode():
        for start in range(0, len(order), batch):
            chunk = [entries[r] for r in order[start : start + batch]]
            parts.append(
                model.encode_items(
                    [e.text for _, e in chunk],
                    [i for i, _ in chunk],
                    [e.text_hash for _, e in chunk],
                    [e.categories for _, e in chunk],
                )
            )
        vecs = torch.cat(parts)
        out = torch.empty_like(vecs)
        out[torch.tensor(order, device=vecs.device)] = vecs
    return out


def model_snapshot(
    number: int, model: RecModel, entries: Sequence[tuple[str, CatalogEntry]], vecs: torch.Tensor
) -> ServingModel:
    ids = tuple(i for i, _ in entries)
    return ServingModel(
        version=str(number),
        number=number,
        model=model,
        item_ids=ids,
        index={i: r for r, i in enumerate(ids)},
        item_vecs=vecs,
        text_hashes=tuple(e.text_hash for _, e in entries),
    )


def apply_item_changes(
    sm: ServingModel,
    changes: Mapping[str, CatalogEntry | None],
    encode: Callable[[Sequence[tuple[str, CatalogEntry]]], torch.Tensor] | None,
) -> ServingModel | None:
    """A new snapshot with ``changes`` (entry, or None = removed) applied; None if nothing changes.

    New items are appended (in the order of ``changes``), changed texts are
    re-encoded in place, removed items dropped.  ``encode`` computes vectors
    with the snapshot's model (None for a model-less snapshot).
    """
    removed = {i for i, e in changes.items() if e is None and i in sm.index}
    fresh = [
        (i, e)
        for i, e in changes.items()
        if e is not None and (i not in sm.index or sm.text_hashes[sm.index[i]] != e.text_hash)
    ]
    if not removed and not fresh:
        return None
    new_vecs = encode(fresh) if (encode is not None and fresh and sm.item_vecs is not None) else None
    fresh_row = {i: r for r, (i, _) in enumerate(fresh)}
    keep = [r for r, i in enumerate(sm.item_ids) if i not in removed]
    ids = [sm.item_ids[r] for r in keep]
    hashes = [changes[i].text_hash if i in fresh_row else sm.text_hashes[r] for r, i in zip(keep, ids, strict=True)]  # type: ignore[union-attr]
    appended = [(i, e) for i, e in fresh if i not in sm.index]
    ids.extend(i for i, _ in appended)
    hashes.extend(e.text_hash for _, e in appended)

    vecs = None
    if sm.item_vecs is not None:
        if new_vecs is None:
            raise ValueError("a snapshot with vectors needs an encoder for its changes")
        base = sm.item_vecs[torch.tensor(keep, dtype=torch.long, device=sm.item_vecs.device)].clone()
        replaced = [(r_new, fresh_row[i]) for r_new, i in enumerate(ids[: len(keep)]) if i in fresh_row]
        if replaced:
            dst = torch.tensor([a for a, _ in replaced], device=base.device)
            src = torch.tensor([b for _, b in replaced], device=base.device)
            base[dst] = new_vecs[src].to(base.dtype)
        tail = torch.tensor([fresh_row[i] for i, _ in appended], dtype=torch.long, device=base.device)
        vecs = torch.cat([base, new_vecs[tail].to(base.dtype)]) if appended else base
    return ServingModel(
        version=sm.version,
        number=sm.number,
        model=sm.model,
        item_ids=tuple(ids),
        index={i: r for r, i in enumerate(ids)},
        item_vecs=vecs,
        text_hashes=tuple(hashes),
    )


def same_item_tower(a: RecModel, b: RecModel) -> bool:
    """Whether two models compute the same item vectors (same config and item-tower tensors)."""
    if a.config != b.config:
        return False
    sa, sb = a.item_tower.state_dict(), b.item_tower.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k].to(sa[k].device)) for k in sa)


def check_finite(sm: ServingModel) -> None:
    """Refuse a snapshot whose item vectors, or a probe user's scores, are not finite (broken weights)."""
    if sm.model is None or sm.item_vecs is None:
        return
    with torch.inference_mode():
        if not bool(torch.isfinite(sm.item_vecs).all()):
            raise WeightsError(f"version {sm.version}: item vectors are not finite (NaN/inf weights)")
        d = sm.item_vecs.shape[1] if sm.item_vecs.ndim == 2 else sm.model.vector_width
        dev = sm.item_vecs.device
        probe = sm.model.encode_users(
            torch.zeros((1, 1, d), device=dev), torch.zeros((1, 1), dtype=torch.bool, device=dev), ["probe"]
        )
        items = sm.item_vecs[:64] if len(sm.item_vecs) else torch.ones((1, d), device=dev)
        if not bool(torch.isfinite(sm.model.score_matrix(probe, items)).all()):
            raise WeightsError(f"version {sm.version}: scores are not finite (NaN/inf weights)")


# --------------------------------------------------------------------------- the holder
class ModelHolder:
    """The one reference to the live snapshot: read it lock-free, replace it atomically."""

    def __init__(self, initial: ServingModel) -> None:
        self._current = initial
        self._changed = threading.Condition()

    @property
    def current(self) -> ServingModel:
        return self._current

    def swap(self, new: ServingModel) -> ServingModel:
        """Make ``new`` the live snapshot; return the old one."""
        with self._changed:
            old, self._current = self._current, new
            self._changed.notify_all()
        return old

    def wait_for(self, predicate: Callable[[ServingModel], bool], timeout: float) -> ServingModel | None:
        """Block until ``predicate(current)`` holds (return it) or ``timeout`` passes (None)."""
        with self._changed:
            ok = self._changed.wait_for(lambda: predicate(self._current), timeout=timeout)
            return self._current if ok else None


# --------------------------------------------------------------------------- the catalog
class CatalogState:
    """The catalog as read from ``items``, and which items changed since the loader last looked."""

    def __init__(self) -> None:
        self._catalog = Catalog()
        self._changed: dict[str, None] = {}  # insertion-ordered set
        self._lock = threading.Lock()
        self.wakeup: Callable[[], None] = lambda: None

    def upsert(self, item: Item) -> bool:
        with self._lock:
            changed = self._catalog.upsert(item)
            if changed:
                self._changed[item.item_id] = None
        if changed:
            self.wakeup()
        return changed

    def remove(self, item_id: str) -> bool:
        with self._lock:
            removed = self._catalog.remove(item_id)
            if removed:
                self._changed[item_id] = None
        if removed:
            self.wakeup()
        return removed

    def entries(self) -> list[tuple[str, CatalogEntry]]:
        """Every item in first-insertion order (clears the change set: the caller sees everything)."""
        with self._lock:
            self._changed.clear()
            return [(i, self._catalog.get(i)) for i in self._catalog.item_ids()]  # type: ignore[misc]

    def take_changes(self) -> dict[str, CatalogEntry | None]:
        """Items changed since the last call (entry, or None when removed)."""
        with self._lock:
            ids, self._changed = list(self._changed), {}
            return {i: self._catalog.get(i) for i in ids}

    def has_changes(self) -> bool:
        return bool(self._changed)

    def __len__(self) -> int:
        return len(self._catalog)


# --------------------------------------------------------------------------- the loader
def refusal_reason(exc: BaseException) -> str:
    """A short label for ``refused_versions_total{reason}``."""
    if not isinstance(exc, WeightsError):
        return "error"
    msg = str(exc)
    checks = (
        ("sha256", "checksum"),
        ("truncated", "truncated"),
        ("bytes but the manifest", "size"),
        ("not valid safetensors", "corrupt"),
        ("missing", "missing"),
        ("not found", "missing"),
        ("do not fit", "mismatch"),
        ("shape", "mismatch"),
        ("lacks", "mismatch"),
        ("config", "config"),
        ("not finite", "non_finite"),
    )
    for needle, reason in checks:
        if needle in msg:
            return reason
    return "invalid"


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
        device: str = "cpu",
        encode_batch: int = 256,
        prefix_cache_items: int = 20_000,
        nice: int = 0,
        fallback_version: str,
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
        self._prefix_cache = None
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
                             created=time.monotonic())
                encoded = 0
            else:
                entries = self.catalog.entries()
                vecs = encode_entries(model, entries, batch=self.encode_batch)
                sm = model_snapshot(update.version, model, entries, vecs)
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

    def _attach_prefix_cache(self, model: RecModel) -> None:
        if self._prefix_cache_items <= 0 or model.item_tower.frozen == 0:
            return
        if self._prefix_cache is None:
            from trainer.prefix_cache import PrefixCache

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


def items_entries(items: Iterable[Item]) -> list[tuple[str, CatalogEntry]]:
    """Catalog entries of some items (last write wins), for tests and benchmarks."""
    cat = Catalog(items)
    return [(i, cat.get(i)) for i in cat.item_ids()]  # type: ignore[misc]
