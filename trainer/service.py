"""The trainer service: ``labeled`` (+ ``items``) from Kafka → continual learner → weight store.

What it does, in order, in one thread:

1. **Catalog.**  Reads the compacted ``items`` topic from the beginning up to
   its end as of start-up (so the catalog is complete), then keeps following
   it: new items and text changes arrive while training.
2. **Resume.**  Loads the checkpoint (refusing one written for another model
   config): learner state, the ``labeled`` offsets trained up to, the
   example_id dedupe window, held-back examples, version counters.  Partitions
   are *assigned* (no group rebalancing) and positioned at the checkpointed
   offsets; the consumer group's committed offsets are only written (for lag
   monitoring), never trusted over the checkpoint.
3. **Micro-batches.**  Fetched examples queue per partition, in offset order.
   A batch is cut when ``batch_size`` examples are queued or the oldest has
   waited ``max_batch_wait_s``.  Taking an example out of its queue advances
   that partition's offset; redelivered example_ids (bounded window) are
   dropped; malformed records went to ``dead-letters`` on arrival.
   A deterministic ``holdout_fraction`` of example_ids (a hash) is held back
   from training for the publish guardrail.
4. **Missing items.**  An example whose item is not in the catalog yet
   *waits*: its partition stops at it (later examples of that partition wait
   behind it, so offsets stay contiguous) until the item arrives on
   ``items``, for at most ``missing_item_wait_s``; then it goes to
   ``dead-letters`` with the reason and the partition moves on.  Other
   partitions keep training meanwhile.  Waiting, not a fallback text: the
   item tower learns from real text only.
5. **Publish.**  Every ``publish_every_steps`` steps or ``publish_every_s``
   seconds, if the guardrail passes (the candidate's ``guardrail_metric`` on
   the recent held-back examples is no worse than the live version's by more
   than ``guardrail_margin``), writes a version (full, or a delta of the
   trainable parameters) to the weight store, announces it on
   ``model-updates`` (key = model name), makes it the distillation teacher,
   then checkpoints.
6. **Checkpoint.**  At every publish, every ``checkpoint_every_steps`` steps
   and at SIGTERM/SIGINT: atomically, then commits the offsets to the group.
   A restart resumes from it: nothing skipped, nothing trained twice.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from pydantic import ValidationError

from contract.errors import ConfigError, RecordError, StreamrecError
from contract.records import DeadLetter, Item, Labeled
from contract.settings import KafkaSettings
from contract.topics import DEAD_LETTERS, ITEMS, LABELED, MODEL_UPDATES
from trainer.catalog import Catalog
from trainer.checkpoint import (
    Checkpoint,
    check_model_config,
    checkpoint_path,
    load_checkpoint,
    remove_stale_temp_files,
    save_checkpoint,
)
from trainer.guardrail import Refusal, beats_fallback, guardrail_passes
from trainer.metrics import binary_metrics, paired_log_loss_se
from trainer.metrics import finite as _finite
from trainer.popularity import Popularity
from trainer.service_settings import ENV_PREFIX, TrainerSettings
from trainer.weights import (
    WeightsError,
    WeightStore,
    changed_tensors,
    config_mismatch,
    cpu_state,
    locate_version,
    state_bytes,
)

log = logging.getLogger(__name__)
_rdkafka_log = logging.getLogger(f"{__name__}.librdkafka")


class TrainerServiceError(StreamrecError):
    """The trainer service cannot start or go on (missing topic, broker unreachable...)."""


# --------------------------------------------------------------------------- pure helpers
def held_back(example_id: str, fraction: float, seed: int = 0) -> bool:
    """Whether an example is held back from training for the guardrail (stable across restarts)."""
    if fraction <= 0.0:
        return False
    digest = hashlib.blake2b(f"{seed}:{example_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64 < fraction


class DedupeWindow:
    """The most recent ``capacity`` example_ids, to drop redelivered examples."""

    def __init__(self, capacity: int, ids: Iterable[str] = ()) -> None:
        self.capacity = capacity
        self._order: deque[str] = deque()
        self._set: set[str] = set()
        for i in ids:
            self.add(i)

    def __contains__(self, example_id: object) -> bool:
        return example_id in self._set

    def __len__(self) -> int:
        return len(self._order)

    def add(self, example_id: str) -> None:
        if self.capacity <= 0 or example_id in self._set:
            return
        self._order.append(example_id)
        self._set.add(example_id)
        while len(self._order) > self.capacity:
            self._set.discard(self._order.popleft())

    def state(self) -> list[str]:
        return list(self._order)


def dedupe_key(example: Labeled) -> str:
    """The idempotency key: example_id, except that a late positive (which corrects the fake
    negative of the same example_id) is an example of its own (as in the learner)."""
    return f"{example.example_id}#late" if example.late else example.example_id


def offsets_key(topic: str, partition: int) -> str:
    return f"{topic}:{partition}"


_MODEL_SETTINGS = {"encoder": "encoder_path", "encoder_layers": "encoder_layers",
                   "freeze_layers": "freeze_layers", "lora_rank": "lora_rank",
                   "max_text_len": "max_text_len", "categories": "categories", "seed": "seed"}


def model_config_from(fields: dict[str, Any]) -> Any:
    """A ModelConfig from the trainer settings; a bad value raises ConfigError naming its setting."""
    from trainer.model import ModelConfig

    try:
        return ModelConfig(**fields)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        field = str(err["loc"][0]) if err["loc"] else ""
        setting = _MODEL_SETTINGS.get(field, "model_options")
        raise ConfigError(f"{ENV_PREFIX}{setting}".upper(), f"{field}: {err['msg']}") from None


# --------------------------------------------------------------------------- metrics
class TrainerMetrics:
    """Prometheus metrics of one trainer (own registry, so tests can run several)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        p = "streamrec_trainer_"
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
        self.publish_failures = Counter(p + "publish_failures", "Versions the store could not take", registry=r)
        self.dead_letters = Counter(p + "dead_letters", "Records sent to dead-letters", ["topic"], registry=r)
        self.items = Counter(p + "items_consumed", "Item records read into the catalog", registry=r)
        self.loss = Gauge(p + "last_step_loss", "Total loss of the last step", registry=r)
        self.auc = Gauge(p + "prequential_auc", "Prequential (test-then-train) AUC over the recent "
                         "window or since the start", ["scope"], registry=r)
        self.live_version = Gauge(p + "live_version", "Newest published version", registry=r)
        self.lag = Gauge(p + "lag", "Labeled records not yet trained (all partitions)", registry=r)
        self.catalog = Gauge(p + "catalog_items", "Items in the catalog", registry=r)
        self.step_seconds = Histogram(
            p + "step_seconds", "Duration of one training step",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r,
        )


# --------------------------------------------------------------------------- queues
@dataclass
class _Entry:
    offset: int
    seq: int
    arrived: float
    example: Labeled | None  # None: malformed, already dead-lettered


@dataclass
class _PartitionQueue:
    entries: deque[_Entry] = field(default_factory=deque)
    blocked_since: float | None = None
    paused: bool = False


# --------------------------------------------------------------------------- service
class TrainerService:
    """One trainer process: see the module docstring.  ``run()`` blocks until ``stop()``."""

    def __init__(
        self,
        settings: TrainerSettings,
        kafka: KafkaSettings,
        *,
        metrics: TrainerMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.kafka = kafka
        self.metrics = metrics or TrainerMetrics()
        self.labeled_topic = LABELED.real_name(kafka)
        self.items_topic = ITEMS.real_name(kafka)
        self.updates_topic = MODEL_UPDATES.real_name(kafka)
        self.dead_topic = DEAD_LETTERS.real_name(kafka)
        try:
            self.store = WeightStore(settings.weights_root)
        except WeightsError as exc:
            raise ConfigError(f"{ENV_PREFIX}WEIGHTS_ROOT", str(exc)) from exc
        model_config_from(settings.model_overrides())  # fail now, not after the catalog load
        self._init_source: tuple[WeightStore, int] | None = None
        if settings.init_from is not None:
            self._init_source = self._check_init_from()
        self._learner_config()
        from trainer.learner import LearnerError, resolve_device

        try:
            resolve_device(settings.device)
        except LearnerError as exc:
            raise ConfigError(f"{ENV_PREFIX}DEVICE", str(exc)) from exc
        self.catalog = Catalog()
        self._stop = threading.Event()
        self.ready = threading.Event()
        """Set once the catalog is loaded and the learner resumed (tests wait on it)."""

        self._consumer: Consumer | None = None
        self._producer: Producer | None = None
        self.learner: Any = None
        self.model: Any = None
        self._model_config: dict[str, Any] = {}
        self._queues: dict[int, _PartitionQueue] = {}
        self._offsets: dict[int, int] = {}
        self._seq = 0
        self._dedupe = DedupeWindow(settings.dedupe_window)
        self._holdout: deque[Labeled] = deque(maxlen=settings.holdout_size)
        self._live_model: Any = None
        self._live_version: int | None = None
        self._last_full_version: int | None = None
        self._next_version = 1
        self._publishes_since_full = 0
        self._steps = 0
        self._steps_since_attempt = 0
        self._steps_since_checkpoint = 0
        self._last_publish = time.monotonic()
        self._last_checkpoint = time.monotonic()
        self._checkpointed_offsets: dict[int, int] = {}
        self._live_probs: dict[str, float] = {}
        self.popularity = Popularity(settings.fallback_half_life_s)
        """The popularity fallback as serving computes it, fed by the positives trained on."""
        self._base_state: dict[str, torch.Tensor] | None = None
        """CPU copy of the last full version's tensors: deltas are what differs from it."""
        self._last_log = time.monotonic()
        self._last_partition_check = time.monotonic()
        self._last_step_metrics: dict[str, float] = {}
        self._ids_log: Any = None
        self._ids_log_size = 0
        self._delivery_errors: list[str] = []
        self._counts = {"trained": 0, "held_back": 0, "duplicates": 0, "dead": 0, "consumed": 0}
        self._refusals = {reason.value: 0 for reason in Refusal}

    def _check_init_from(self) -> tuple[WeightStore, int]:
        """Validate STREAMREC_TRAINER_INIT_FROM at start-up: a published version whose model config
        matches the configured one (checked only when no checkpoint will win over it)."""
        s = self.settings
        setting = f"{ENV_PREFIX}INIT_FROM"
        try:
            store, version = locate_version(s.init_from or "")
            man = store.manifest(version)
        except (WeightsError, OSError) as exc:
            raise ConfigError(setting, str(exc)) from exc
        if checkpoint_path(s.checkpoint_dir).exists():
            return store, version  # the checkpoint wins (logged at start); nothing to match
        expected = self._init_config(man.model_config).model_dump(mode="json")
        try:
            diffs = config_mismatch(man.model_config, expected)
        except WeightsError as exc:
            raise ConfigError(setting, str(exc)) from exc
        if diffs:
            raise ConfigError(
                setting,
                f"version {version} in {store.url} was published for another model config "
                f"({'; '.join(diffs)}); set the model settings to match it",
            )
        return store, version

    def _init_config(self, source_config: dict[str, Any]) -> Any:
        """This deployment's model config when it starts from a published version: the settings,
        with the category vocabulary of the source unless STREAMREC_TRAINER_CATEGORIES is given."""
        fields = self.settings.model_overrides()
        if "categories" not in fields:
            fields["categories"] = list(source_config.get("categories", []))
        return model_config_from(fields)

    # --- control ---------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the loop to checkpoint and return (safe from a signal handler or another thread)."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def progress(self) -> dict[str, Any]:
        """A snapshot for monitoring and tests (safe to call from another thread)."""
        return {
            "offsets": {offsets_key(self.labeled_topic, p): o for p, o in dict(self._offsets).items()},
            "steps": self._steps,
            "examples_trained": self._examples_trained(),
            "live_version": self._live_version,
            **{k: v for k, v in self._counts.items() if not k.startswith("_")},
            "refused": dict(self._refusals),
        }

    def run(self) -> None:
        """Start, train until :meth:`stop`, checkpoint, close.  Raises on a fatal error."""
        server = None
        if self.settings.metrics_port:
            try:
                server, _thread = start_http_server(self.settings.metrics_port, registry=self.metrics.registry)
            except OSError as exc:
                raise TrainerServiceError(
                    f"setting STREAMREC_TRAINER_METRICS_PORT: cannot listen on {self.settings.metrics_port}: {exc}"
                ) from exc
            log.info("metrics on http://0.0.0.0:%d/metrics", self.settings.metrics_port)
        clean = False
        try:
            self._start()
            self.ready.set()
            while not self._stop.is_set():
                self._iterate()
            clean = True
        finally:
            try:
                # After a failure the last good checkpoint stays: the restart resumes from it.
                if clean:
                    self._checkpoint(reason="shutdown")
            finally:
                self._close()
                if server is not None:
                    server.shutdown()
                    server.server_close()
        log.info(
            "trainer stopped: %d steps, %d examples trained, version %s live",
            self._steps, self._examples_trained(), self._live_version,
        )

    # --- start-up -----------------------------------------------------------------------
    def _start(self) -> None:
        s = self.settings
        self._producer = Producer(self.kafka.producer_config(logger=_rdkafka_log))
        self._consumer = Consumer(self.kafka.confluent_config(**{
            "group.id": s.group_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": s.start_offset,
            "enable.partition.eof": False,
            "logger": _rdkafka_log,
        }))  # fmt: skip
        labeled_parts = self._partitions(self.labeled_topic)
        item_parts = self._partitions(self.items_topic)

        self._load_catalog(item_parts)
        remove_stale_temp_files(s.checkpoint_dir)  # one trainer per checkpoint dir
        ckpt = load_checkpoint(s.checkpoint_dir)
        self._build_learner(ckpt)
        self._resume(ckpt)
        self._open_ids_log(ckpt)

        assignment = [TopicPartition(self.items_topic, p, self._item_positions[p]) for p in item_parts]
        for p in labeled_parts:
            self._queues[p] = _PartitionQueue()
            assignment.append(TopicPartition(self.labeled_topic, p, self._start_offset(p)))
        self._consumer.assign(assignment)
        log.info(
            "training from %s at %s; %d items in the catalog; next version %d",
            self.labeled_topic,
            ", ".join(f"[{p}]@{self._offsets[p]}" for p in sorted(self._offsets)),
            len(self.catalog),
            self._next_version,
        )

    def _partitions(self, topic: str) -> list[int]:
        assert self._consumer is not None
        try:
            md = self._consumer.list_topics(topic, timeout=30)
        except KafkaException as exc:
            raise TrainerServiceError(
                f"cannot reach the brokers at {self.kafka.bootstrap_servers}: {exc}"
            ) from exc
        meta = md.topics.get(topic)
        if meta is None or meta.error is not None or not meta.partitions:
            reason = meta.error if meta is not None and meta.error is not None else "no such topic"
            raise TrainerServiceError(
                f"topic {topic} is not usable ({reason}); create the topics first (make topics)"
            )
        return sorted(meta.partitions)

    def _load_catalog(self, partitions: list[int]) -> None:
        """Read ``items`` from the beginning to its end as of now."""
        assert self._consumer is not None
        started = time.monotonic()
        ends: dict[int, int] = {}
        for p in partitions:
            low, high = self._consumer.get_watermark_offsets(TopicPartition(self.items_topic, p), timeout=30)
            if high > low:
                ends[p] = high
        # after the load, follow each partition from where the load stopped
        self._item_positions = {p: OFFSET_BEGINNING for p in partitions}
        if ends:
            self._consumer.assign([TopicPartition(self.items_topic, p, 0) for p in ends])
            pending = dict(ends)
            while pending and not self._stop.is_set():
                for msg in self._consumer.consume(num_messages=5000, timeout=0.5):
                    if self._message_error(msg):
                        continue
                    self._on_item(msg)
                    p = msg.partition()
                    if p in pending and msg.offset() + 1 >= pending[p]:
                        del pending[p]
                # control records (transactions) are never delivered: check the positions too
                for tp in self._consumer.position([TopicPartition(self.items_topic, p) for p in pending]):
                    if tp.offset >= 0 and tp.offset >= pending.get(tp.partition, math.inf):
                        pending.pop(tp.partition, None)
            for tp in self._consumer.position([TopicPartition(self.items_topic, p) for p in ends]):
                self._item_positions[tp.partition] = tp.offset if tp.offset >= 0 else ends[tp.partition]
            self._consumer.unassign()
        self.metrics.catalog.set(len(self.catalog))
        log.info("catalog: %d items from %s in %.1fs", len(self.catalog), self.items_topic,
                 time.monotonic() - started)

    def _model_config_for(self, ckpt: Checkpoint | None) -> Any:
        if ckpt is None and self._init_source is not None:
            store, version = self._init_source
            try:
                source = store.manifest(version).model_config
            except (WeightsError, OSError) as exc:
                raise ConfigError(f"{ENV_PREFIX}INIT_FROM", str(exc)) from exc
            return self._init_config(source)
        fields = self.settings.model_overrides()
        if "categories" not in fields:
            # The category vocabulary is fixed when a model is born: from the checkpoint when
            # resuming, from the catalog on a fresh start (a new category later is not a new head).
            if ckpt is not None and "categories" in ckpt.model_config:
                fields["categories"] = list(ckpt.model_config["categories"])
            else:
                fields["categories"] = self.catalog.category_names()
        return model_config_from(fields)

    def _build_learner(self, ckpt: Checkpoint | None) -> None:
        from trainer.learner import ContinualLearner, LearnerError
        from trainer.model import ModelError, build_model

        config = self._model_config_for(ckpt)
        self._model_config = config.model_dump(mode="json")
        if ckpt is not None:
            check_model_config(ckpt.model_config, self._model_config,
                               where=str(self.settings.checkpoint_dir))
        try:
            self.model = build_model(config)
        except ModelError as exc:
            raise ConfigError(f"{ENV_PREFIX}ENCODER_PATH / {ENV_PREFIX}MODEL_OPTIONS", str(exc)) from exc
        if self._init_source is not None:
            store, version = self._init_source
            if ckpt is not None:
                log.info("checkpoint in %s wins over %sINIT_FROM=%s: resuming from the checkpoint, "
                         "not initialising from version %d", self.settings.checkpoint_dir, ENV_PREFIX,
                         self.settings.init_from, version)
            else:
                try:
                    man = store.load_into(self.model, version)
                except (WeightsError, OSError) as exc:
                    raise ConfigError(f"{ENV_PREFIX}INIT_FROM", str(exc)) from exc
                log.info("no checkpoint: initialised the model from version %d of %r in %s (%d examples "
                         "trained there); optimizer, replay buffer and metrics start fresh",
                         version, man.model_name, store.url, man.trained_examples)
        try:
            self.learner = ContinualLearner(self.model, self._learner_config(), self.catalog)
        except LearnerError as exc:
            raise ConfigError(f"{ENV_PREFIX}DEVICE", str(exc)) from exc

    def _learner_config(self) -> Any:
        from trainer.learner import LearnerConfig

        s = self.settings
        fields: dict[str, Any] = {}
        fields.update(s.learner_options)
        fields.setdefault("device", s.device)
        fields.setdefault("seed", s.seed)
        known = set(LearnerConfig.model_fields)
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ConfigError(f"{ENV_PREFIX}LEARNER_OPTIONS",
                              f"unknown learner option(s) {unknown}; known: {sorted(known)}")
        try:
            return LearnerConfig(**fields)
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            field = str(err["loc"][0]) if err["loc"] else ""
            setting = field if field in ("device", "seed") else "learner_options"
            raise ConfigError(f"{ENV_PREFIX}{setting}".upper(), f"{field}: {err['msg']}") from None

    def _resume(self, ckpt: Checkpoint | None) -> None:
        store_next = self.store.next_version()
        if ckpt is None:
            log.info("no checkpoint in %s: starting a fresh model", self.settings.checkpoint_dir)
            self._next_version = store_next
            return
        self.learner.load_state_dict(ckpt.learner_state)
        prefix = f"{self.labeled_topic}:"
        for key, off in ckpt.offsets.items():
            if key.startswith(prefix):
                self._offsets[int(key[len(prefix):])] = off
        for i in ckpt.recent_example_ids:
            self._dedupe.add(i)
        st = ckpt.service_state
        for d in st.get("holdout", []):
            try:
                self._holdout.append(Labeled.from_dict(d))
            except RecordError as exc:
                log.warning("dropping a held-back example from the checkpoint: %s", exc)
        self._steps = int(st.get("steps", 0))
        self._next_version = max(store_next, int(st.get("next_version", 1)))
        self._last_full_version = st.get("last_full_version")
        self._publishes_since_full = int(st.get("publishes_since_full", 0))
        if isinstance(st.get("popularity"), dict):
            self.popularity = Popularity.from_state(st["popularity"], self.settings.fallback_half_life_s)
        live = st.get("live_version")
        if live is not None:
            try:
                self._live_model = self.store.load(int(live), device=self._device())
                if self.model.prefix_cache is not None:
                    self._live_model.attach_cache(self.model.prefix_cache)
                self._live_version = int(live)  # the teacher came back with the learner state
                self.metrics.live_version.set(self._live_version)
            except WeightsError as exc:
                log.warning("live version %s cannot be loaded (%s); the next publish has no guardrail",
                            live, exc)
        if self._last_full_version is not None and self._last_full_version not in self.store.versions():
            self._last_full_version = None  # pruned or lost: the next version is full
        if self._last_full_version is not None and self.settings.publish_kind == "delta":
            try:
                self._base_state = self.store.state(int(self._last_full_version))
            except (WeightsError, OSError) as exc:
                log.warning("base version %s cannot be read (%s); the next version is full",
                            self._last_full_version, exc)
                self._last_full_version = None
        log.info(
            "resumed from checkpoint of %s: %d examples trained, %d steps, offsets %s, live version %s",
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ckpt.created_ts / 1000)),
            ckpt.examples_trained, self._steps, ckpt.offsets, self._live_version,
        )
        self._ids_log_size = int(st.get("trained_ids_log_size", 0))

    def _open_ids_log(self, ckpt: Checkpoint | None) -> None:
        path = self.settings.trained_ids_log
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        keep = self._ids_log_size if ckpt is not None else 0
        self._ids_log = open(path, "a+b")  # noqa: SIM115 - kept open for the service's life
        size = self._ids_log.seek(0, 2)
        if size < keep:
            log.warning("trained-ids log %s is shorter (%d) than the checkpoint says (%d)", path, size, keep)
        elif size > keep:
            log.info("trained-ids log: rolling back %d bytes written after the checkpoint", size - keep)
            self._ids_log.truncate(keep)
        self._ids_log.seek(0, 2)

    def _start_offset(self, p: int) -> int:
        """The checkpointed offset of a partition, else its beginning or end (start_offset)."""
        assert self._consumer is not None
        low, high = self._consumer.get_watermark_offsets(TopicPartition(self.labeled_topic, p), timeout=30)
        off = self._offsets.get(p)
        if off is None:
            off = low if self.settings.start_offset == "earliest" else high
        elif off < low:
            log.warning("%s[%d]: checkpoint offset %d was deleted by retention (first is %d): "
                        "%d examples lost", self.labeled_topic, p, off, low, low - off)
            off = low
        self._offsets[p] = off
        return off

    def _device(self) -> str:
        dev = getattr(self.learner, "device", None)
        return str(dev) if dev is not None else "cpu"

    # --- the loop -------------------------------------------------------------------------
    def _iterate(self) -> None:
        assert self._consumer is not None and self._producer is not None
        now = time.monotonic()
        timeout = self._poll_timeout(now)
        for msg in self._consumer.consume(num_messages=2000, timeout=timeout):
            if self._message_error(msg):
                continue
            if msg.topic() == self.labeled_topic:
                self._on_labeled(msg)
            elif msg.topic() == self.items_topic:
                self._on_item(msg)
        self._producer.poll(0)
        now = time.monotonic()
        if self._batch_due(now):
            self._train_batch(now)
        if self._publish_due(now):
            self._publish(now)
        if self._steps_since_checkpoint >= self.settings.checkpoint_every_steps:
            self._checkpoint(reason=f"{self._steps_since_checkpoint} steps")
        elif (
            self._steps_since_checkpoint == 0
            and self._offsets != self._checkpointed_offsets
            and not any(q.entries for q in self._queues.values())
            and now - self._last_checkpoint >= self.settings.publish_every_s
        ):  # idle, with progress no step covers (duplicates, dead letters, held back only)
            self._checkpoint(reason="idle")
        self._backpressure()
        if now - self._last_log >= self.settings.log_every_s:
            self._log_progress(now)
        if now - self._last_partition_check >= 60:
            self._check_new_partitions()

    def _poll_timeout(self, now: float) -> float:
        oldest = self._oldest_arrival()
        if oldest is None:
            return 0.2
        return max(0.0, min(0.2, oldest + self.settings.max_batch_wait_s - now))

    def _message_error(self, msg: Message) -> bool:
        err = msg.error()
        if err is None:
            return False
        if err.code() == KafkaError._PARTITION_EOF:
            return True
        if err.fatal():
            raise TrainerServiceError(f"fatal consumer error: {err}")
        log.warning("consumer error on %s[%s]: %s", msg.topic(), msg.partition(), err)
        return True

    def _on_item(self, msg: Message) -> None:
        self.metrics.items.inc()
        value = msg.value()
        if value is None:  # tombstone on the compacted topic: the item is gone
            key = msg.key()
            if key:
                self.catalog.remove(key.decode("utf-8", errors="replace"))
            return
        try:
            item = Item.from_json(value)
        except RecordError as exc:
            self._dead_letter(msg, exc)
            return
        self.catalog.upsert(item)
        self.metrics.catalog.set(len(self.catalog))

    def _on_labeled(self, msg: Message) -> None:
        p = msg.partition()
        q = self._queues.get(p)
        if q is None:  # a partition added while we run (assigned by _check_new_partitions)
            q = self._queues[p] = _PartitionQueue()
        try:
            example: Labeled | None = Labeled.from_json(msg.value())
        except RecordError as exc:
            self._dead_letter(msg, exc)
            example = None
        self._seq += 1
        q.entries.append(_Entry(msg.offset(), self._seq, time.monotonic(), example))

    def _oldest_arrival(self) -> float | None:
        heads = [q.entries[0].arrived for q in self._queues.values() if q.entries]
        return min(heads, default=None)

    def _batch_due(self, now: float) -> bool:
        queued = sum(len(q.entries) for q in self._queues.values())
        if queued == 0:
            return False
        if queued >= self.settings.batch_size:
            return True
        oldest = self._oldest_arrival()
        return oldest is not None and now - oldest >= self.settings.max_batch_wait_s

    def _next_head(self, now: float) -> tuple[int, _PartitionQueue] | None:
        """The queue whose head arrived first among those not waiting for an item."""
        best: tuple[int, _PartitionQueue] | None = None
        for p, q in self._queues.items():
            while q.entries:
                head = q.entries[0]
                if head.example is None or head.example.item_id in self.catalog:
                    break
                if q.blocked_since is None:
                    q.blocked_since = now
                    log.info("%s[%d]@%d: item %s not in the catalog yet; the partition waits up to %.0fs",
                             self.labeled_topic, p, head.offset, head.example.item_id,
                             self.settings.missing_item_wait_s)
                if now - q.blocked_since < self.settings.missing_item_wait_s:
                    break
                q.entries.popleft()
                q.blocked_since = None
                self._offsets[p] = head.offset + 1
                self._dead_letter_example(p, head, f"item {head.example.item_id} not in the catalog "
                                                   f"after {self.settings.missing_item_wait_s:.0f}s")
            if not q.entries:
                continue
            head = q.entries[0]
            if head.example is not None and head.example.item_id not in self.catalog:
                continue
            if best is None or head.seq < best[1].entries[0].seq:
                best = (p, q)
        return best

    def _train_batch(self, now: float) -> None:
        train: list[Labeled] = []
        held: list[Labeled] = []
        advanced: dict[int, int] = {}  # applied once the step succeeded
        while len(train) + len(held) < self.settings.batch_size:
            nxt = self._next_head(now)
            if nxt is None:
                break
            p, q = nxt
            entry = q.entries.popleft()
            q.blocked_since = None
            advanced[p] = entry.offset + 1
            self.metrics.consumed.inc()
            ex = entry.example
            if ex is None:
                continue
            key = dedupe_key(ex)
            if key in self._dedupe:
                self.metrics.duplicates.inc()
                self._counts["duplicates"] += 1
                log.debug("dropping redelivered example %s", key)
                continue
            self._dedupe.add(key)
            if held_back(ex.example_id, self.settings.holdout_fraction, self.settings.seed):
                held.append(ex)
            else:
                train.append(ex)
        self._holdout.extend(held)
        self.metrics.held_back.inc(len(held))
        self._counts["held_back"] += len(held)
        if train:
            started = time.perf_counter()
            result = self.learner.step(train)
            self.metrics.step_seconds.observe(time.perf_counter() - started)
            self._steps += 1
            self._steps_since_attempt += 1
            self._steps_since_checkpoint += 1
            self._counts["trained"] += len(train)
            for ex in train:  # serving's fallback counts each click once (a late one too)
                if ex.label == 1:
                    self.popularity.add((ex.item_id,), ex.label_ts)
            self.metrics.steps.inc()
            self.metrics.trained.inc(len(train))
            self._last_step_metrics = {k: float(v) for k, v in result.items()}
            loss = result.get("loss")
            if _finite(loss):
                self.metrics.loss.set(float(loss))  # type: ignore[arg-type]
            pq = self._prequential()
            for scope in ("window", "cumulative"):
                auc = pq.get(f"{scope}_auc")
                if _finite(auc):
                    self.metrics.auc.labels(scope=scope).set(float(auc))  # type: ignore[arg-type]
        self._offsets.update(advanced)
        if self._ids_log is not None and (train or held):
            lines = [f"T {ex.example_id}\n" for ex in train] + [f"H {ex.example_id}\n" for ex in held]
            self._ids_log.write("".join(lines).encode())
            self._ids_log.flush()

    def _prequential(self) -> dict[str, float]:
        snap = self.learner.metrics.snapshot()
        return {k: float(v) for k, v in snap.items() if isinstance(v, (int, float))}

    def _examples_trained(self) -> int:
        return int(getattr(self.learner, "examples_trained", 0)) if self.learner is not None else 0

    # --- publishing -------------------------------------------------------------------------
    def _publish_due(self, now: float) -> bool:
        if self._steps_since_attempt == 0:
            return False
        return (
            self._steps_since_attempt >= self.settings.publish_every_steps
            or now - self._last_publish >= self.settings.publish_every_s
        )

    def _guardrail(self) -> tuple[bool, dict[str, float], dict[str, float]]:
        """(publish?, guardrail metrics for the manifest, candidate predictions by example key).

        With no live version the candidate must beat the popularity fallback
        (:func:`beats_fallback`); with one, it must be no worse than it
        (:func:`guardrail_passes`).  The fallback's held-back AUC is computed
        (and published in the manifest) either way.
        """
        s = self.settings
        if s.holdout_fraction <= 0:
            return True, {}, {}
        holdout = list(self._holdout)
        if len(holdout) < s.guardrail_min_examples:
            log.info("publish postponed: %d held-back examples, the guardrail needs %d",
                     len(holdout), s.guardrail_min_examples)
            return False, {}, {}
        cand_probs, kept = self.learner.predict(holdout)
        cand = {dedupe_key(holdout[i]): float(p) for i, p in zip(kept, cand_probs, strict=True)}
        by_key = {dedupe_key(ex): ex for ex in holdout}
        keys = list(cand)
        y = [by_key[k].label for k in keys]
        pc = [cand[k] for k in keys]
        fallback = self.popularity.vector([by_key[k].item_id for k in keys])
        fb_ok, fb_refusal, fb_why, extra = beats_fallback(y, pc, fallback, z=s.guardrail_fallback_z)
        extra["holdout_examples"] = float(len(keys))
        if self._live_model is None:
            if not fb_ok:
                assert fb_refusal is not None
                self._refuse(fb_refusal, f"against the popularity fallback on {len(keys)} held-back "
                                         f"examples: {fb_why}")
                return False, extra, cand
            log.info("guardrail passed against the popularity fallback on %d held-back examples: %s",
                     len(keys), fb_why)
            return True, extra, cand
        # The live version does not change between publishes: score each held-back example once.
        new = [ex for ex in holdout if dedupe_key(ex) in cand and dedupe_key(ex) not in self._live_probs]
        if new:
            live_probs, live_kept = self.learner.predict(new, self._live_model)
            for i, p in zip(live_kept, live_probs, strict=True):
                self._live_probs[dedupe_key(new[i])] = float(p)
        keys = [k for k in cand if k in self._live_probs]
        y = [by_key[k].label for k in keys]
        pc, pl = [cand[k] for k in keys], [self._live_probs[k] for k in keys]
        cand_m, live_m = binary_metrics(y, pc), binary_metrics(y, pl)
        ok, reason, why = guardrail_passes(
            cand_m, live_m, metric=s.guardrail_metric, margin=s.guardrail_margin,
            z=s.guardrail_z, loss_diff_se=paired_log_loss_se(y, pc, pl),
        )
        extra.update({f"holdout_{k}": float(v) for k, v in cand_m.items() if _finite(v)})
        extra.update({f"live_holdout_{k}": float(v) for k, v in live_m.items() if _finite(v)})
        if not ok:
            assert reason is not None
            self._refuse(reason, f"against live version {self._live_version}: {why}")
        else:
            log.info("guardrail passed against live version %s on %d held-back examples: %s "
                     "(vs the popularity fallback: %s)", self._live_version, len(keys), why, fb_why)
        return ok, extra, cand

    def _refuse(self, reason: Refusal, why: str) -> None:
        self.metrics.rejections.labels(reason=reason.value).inc()
        self._refusals[reason.value] += 1
        log.warning("guardrail refused the candidate after step %d (reason=%s) %s",
                    self._steps, reason.value, why)

    def _publish(self, now: float) -> None:
        s = self.settings
        # A refused or postponed attempt waits a full interval (steps or seconds) too.
        self._last_publish = now
        self._steps_since_attempt = 0
        bad = [k for k, t in self.model.trainable_state_dict().items() if not bool(torch.isfinite(t).all())]
        if bad:
            self._refuse(Refusal.NON_FINITE, f"non-finite parameters {bad[:5]}")
            return
        ok, guard, cand_probs = self._guardrail()
        if not ok:
            return
        tensors = self._delta_tensors()
        delta = tensors is not None
        metrics = {f"prequential_{k}": v for k, v in self._prequential().items() if _finite(v)}
        metrics.update({f"step_{k}": v for k, v in self._last_step_metrics.items() if _finite(v)})
        metrics.update(guard)
        source_offsets = {offsets_key(self.labeled_topic, p): o for p, o in sorted(self._offsets.items())}
        for attempt in (1, 2):
            version = self._next_version
            try:
                update = self.store.publish(
                    self.model,
                    version=version,
                    kind="delta" if delta else "full",
                    base_version=self._last_full_version if delta else None,
                    tensors=tensors,
                    metrics=metrics,
                    trained_examples=self._examples_trained(),
                    source_offsets=source_offsets,
                    model_name=s.model_name,
                )
                break
            except (WeightsError, OSError) as exc:
                if "already exists" in str(exc) and attempt == 1:  # another writer took the number
                    self._next_version = self.store.next_version()
                    continue
                # Storage trouble (disk full, unreachable fsspec store): keep training, retry later.
                self.metrics.publish_failures.inc()
                log.error("publishing version %d to %s failed: %s", version, self.store.url, exc)
                return
        self._next_version = version + 1
        if delta:
            self._publishes_since_full += 1
        else:
            self._last_full_version = version
            self._publishes_since_full = 0
            if s.publish_kind == "delta":
                self._base_state = cpu_state(self.model)
        try:
            size = self.store.manifest(version).size
            self.metrics.published_bytes.labels(kind=update.kind).inc(size)
        except (WeightsError, OSError):
            pass
        self._announce(update)
        self._live_version = version
        self._refresh_live_model(version)
        self._live_probs = cand_probs  # the candidate is the live version now
        self.learner.set_teacher(self.model.trainable_state_dict())
        self.metrics.published.labels(kind=update.kind).inc()
        self.metrics.live_version.set(version)
        log.info(
            "published version %d (%s%s) after %d examples: auc %s, logloss %s; offsets %s",
            version, update.kind, f" on {update.base_version}" if update.base_version else "",
            update.trained_examples,
            _fmt(metrics.get("prequential_window_auc")), _fmt(metrics.get("prequential_window_log_loss")),
            source_offsets,
        )
        self._checkpoint(reason=f"version {version}")
        if s.keep_versions:
            try:
                self.store.prune(s.keep_versions)
            except (WeightsError, OSError) as exc:
                log.warning("pruning the weight store failed: %s", exc)

    def _delta_tensors(self) -> dict[str, torch.Tensor] | None:
        """The tensors of the next version when it is a delta; None when it is full.

        Full: with publish_kind=full, for the first version (or after the base was
        lost), every ``full_every``-th version, and whenever the delta (what changed
        since the base) would be at least half the size of a full snapshot.
        """
        s = self.settings
        if (
            s.publish_kind != "delta"
            or self._last_full_version is None
            or self._base_state is None
            or self._publishes_since_full + 1 >= s.full_every
        ):
            return None
        state = self.model.state_dict()
        tensors = changed_tensors(state, self._base_state)
        if not tensors or 2 * state_bytes(tensors) >= state_bytes(state):
            log.info("a delta would hold %.1f of %.1f MB: publishing a full version",
                     state_bytes(tensors) / 1e6, state_bytes(state) / 1e6)
            return None
        return tensors

    def _refresh_live_model(self, version: int) -> None:
        """The guardrail's copy of the live version: loaded once from the store, then copied in."""
        if self._live_model is None:
            self._live_model = self.store.load(version, device=self._device())
            if self.model.prefix_cache is not None:  # same frozen prefix: share its cached states
                self._live_model.attach_cache(self.model.prefix_cache)
        else:
            self._live_model.load_state_dict(self.model.state_dict())
        self._live_model.eval()

    def _announce(self, update: Any) -> None:
        assert self._producer is not None
        errors: list[str] = []

        def on_delivery(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                errors.append(str(err))

        self._produce(self.updates_topic, update.kafka_key(), update.to_json(), on_delivery)
        left = self._producer.flush(30)
        if left or errors:
            log.error("announcing version %d on %s failed (%s); it is in the store at %s",
                      update.version, self.updates_topic, errors or f"{left} undelivered", update.uri)

    def _produce(self, topic: str, key: bytes | None, value: bytes, cb: Any = None) -> None:
        assert self._producer is not None
        while True:
            try:
                self._producer.produce(topic, key=key, value=value, on_delivery=cb or self._on_delivery)
                return
            except BufferError:
                self._producer.poll(0.1)

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            log.error("delivery to %s failed: %s", msg.topic(), err)

    # --- dead letters ---------------------------------------------------------------------
    def _dead_letter(self, msg: Message, error: BaseException | str) -> None:
        log.warning("%s[%d]@%d -> dead-letters: %s", msg.topic(), msg.partition(), msg.offset(), error)
        dl = DeadLetter.of(
            source_topic=msg.topic(), partition=msg.partition(), offset=msg.offset(),
            key=msg.key(), value=msg.value(), error=error, ts=int(time.time() * 1000),
        )
        self._produce(self.dead_topic, msg.key(), dl.to_json())
        self.metrics.dead_letters.labels(topic=msg.topic()).inc()
        self._counts["dead"] += 1

    def _dead_letter_example(self, p: int, entry: _Entry, reason: str) -> None:
        assert entry.example is not None
        log.warning("%s[%d]@%d -> dead-letters: %s", self.labeled_topic, p, entry.offset, reason)
        dl = DeadLetter.of(
            source_topic=self.labeled_topic, partition=p, offset=entry.offset,
            key=entry.example.kafka_key(), value=entry.example.to_json(), error=reason,
            ts=int(time.time() * 1000),
        )
        self._produce(self.dead_topic, entry.example.kafka_key(), dl.to_json())
        self.metrics.dead_letters.labels(topic=self.labeled_topic).inc()
        self._counts["dead"] += 1

    # --- checkpoints ------------------------------------------------------------------------
    def _checkpoint(self, *, reason: str) -> None:
        if self.learner is None:
            return
        started = time.perf_counter()
        ids_size = 0
        if self._ids_log is not None:
            self._ids_log.flush()
            ids_size = self._ids_log.tell()
        ckpt = Checkpoint(
            learner_state=self.learner.state_dict(),
            offsets={offsets_key(self.labeled_topic, p): o for p, o in sorted(self._offsets.items())},
            examples_trained=self._examples_trained(),
            recent_example_ids=self._dedupe.state(),
            model_config=self._model_config,
            settings=self.settings.model_dump(mode="json"),
            service_state={
                "steps": self._steps,
                "next_version": self._next_version,
                "live_version": self._live_version,
                "last_full_version": self._last_full_version,
                "publishes_since_full": self._publishes_since_full,
                "holdout": [ex.to_dict() for ex in self._holdout],
                "popularity": self.popularity.state(),
                "trained_ids_log_size": ids_size,
            },
        )
        save_checkpoint(self.settings.checkpoint_dir, ckpt)
        self._steps_since_checkpoint = 0
        self._checkpointed_offsets = dict(self._offsets)
        self._last_checkpoint = time.monotonic()
        log.info("checkpoint (%s): %d examples trained, offsets %s, in %.2fs",
                 reason, ckpt.examples_trained, ckpt.offsets, time.perf_counter() - started)
        self._commit()

    def _commit(self) -> None:
        """Commit the checkpointed offsets to the group (monitoring; the checkpoint is the truth)."""
        if self._consumer is None or not self._offsets:
            return
        tps = [TopicPartition(self.labeled_topic, p, o) for p, o in sorted(self._offsets.items())]
        try:
            self._consumer.commit(offsets=tps, asynchronous=False)
        except KafkaException as exc:
            log.warning("committing offsets to group %s failed: %s", self.settings.group_id, exc)

    # --- housekeeping -----------------------------------------------------------------------
    def _backpressure(self) -> None:
        assert self._consumer is not None
        cap = self.settings.max_queued_per_partition
        for p, q in self._queues.items():
            if not q.paused and len(q.entries) >= cap:
                self._consumer.pause([TopicPartition(self.labeled_topic, p)])
                q.paused = True
            elif q.paused and len(q.entries) < cap // 2:
                self._consumer.resume([TopicPartition(self.labeled_topic, p)])
                q.paused = False

    def _check_new_partitions(self) -> None:
        assert self._consumer is not None
        self._last_partition_check = time.monotonic()
        try:
            parts = self._partitions(self.labeled_topic)
        except TrainerServiceError as exc:
            log.warning("partition check failed: %s", exc)
            return
        new = [p for p in parts if p not in self._queues]
        if new:
            tps = []
            for p in new:
                self._queues[p] = _PartitionQueue()
                tps.append(TopicPartition(self.labeled_topic, p, self._start_offset(p)))
            self._consumer.incremental_assign(tps)
            log.info("%s gained partitions %s; consuming them too", self.labeled_topic, new)

    def _lag(self) -> int:
        assert self._consumer is not None
        total = 0
        for p, off in self._offsets.items():
            try:
                _low, high = self._consumer.get_watermark_offsets(
                    TopicPartition(self.labeled_topic, p), cached=True)
            except KafkaException:
                continue
            if high >= 0:
                total += max(0, high - off)
        return total

    def _log_progress(self, now: float) -> None:
        elapsed = now - self._last_log
        self._last_log = now
        lag = self._lag()
        self.metrics.lag.set(lag)
        pq = self._prequential()
        rate = (self._counts["trained"] - self._counts.get("_last_trained", 0)) / max(elapsed, 1e-9)
        log.info(
            "progress: %d trained (%.1f/s), %d held back, %d duplicates, %d dead letters; "
            "step %d, loss %s, prequential auc %s; lag %d, queued %d; live version %s",
            self._counts["trained"], rate,
            self._counts["held_back"], self._counts["duplicates"], self._counts["dead"],
            self._steps, _fmt(self._last_step_metrics.get("loss")), _fmt(pq.get("window_auc")),
            lag, sum(len(q.entries) for q in self._queues.values()), self._live_version,
        )
        self._counts["_last_trained"] = self._counts["trained"]

    def _close(self) -> None:
        if self._consumer is not None:
            try:
                self._consumer.close()
            except (KafkaException, RuntimeError) as exc:
                log.warning("closing the consumer: %s", exc)
            self._consumer = None
        if self._producer is not None:
            left = self._producer.flush(10)
            if left:
                log.warning("%d dead letter(s) or announcements undelivered at shutdown", left)
            self._producer = None
        if self._ids_log is not None:
            self._ids_log.close()
            self._ids_log = None


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if _finite(v) else "n/a"


def trained_ids(path: str | Path) -> list[tuple[str, str]]:
    """Read a trained-ids debug log: ``[(T|H, example_id), ...]`` in training order."""
    out = []
    for line in Path(path).read_text().splitlines():
        kind, _, example = line.partition(" ")
        if example:
            out.append((kind, example))
    return out
