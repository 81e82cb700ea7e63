"""Settings of the scoring agent, read once from the environment (prefix ``STREAMREC_SERVING_``).

Kafka connection settings are the shared :class:`contract.settings.KafkaSettings`
(prefix ``STREAMREC_``); everything specific to serving lives here.  Build it
with ``contract.settings.load(ServingSettings)``: a setting that cannot work
raises :class:`~contract.errors.ConfigError` naming the environment variable,
before anything connects.  :func:`check_runtime` checks what needs the
machine (the device, the weight store root) and fails the same way.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from contract.errors import ConfigError
from contract.settings import default_cache_dir

if TYPE_CHECKING:
    import torch

ENV_PREFIX = "STREAMREC_SERVING_"
FALLBACK_VERSION = "fallback:popularity"
"""``model_version`` of recommendations made without a model (popularity over recent clicks)."""
QUERY_FALLBACK_VERSION = "fallback:query"
"""``model_version`` of a query request answered without a model (the pretrained encoder alone)."""


def _default_weights_root() -> str:
    return str(default_cache_dir() / "weights")


class ServingSettings(BaseSettings):
    """Everything the scoring agent can be told; see ``python -m serving --help``."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="ignore")

    # --- identity and storage -----------------------------------------------------------
    model_name: str = Field(
        default="streamrec", min_length=1, max_length=256,
        description="Model name: only model-updates with this key are loaded.",
    )
    weights_root: str = Field(
        default_factory=_default_weights_root,
        description="Weight store root (directory or fsspec URL), searched at start-up for the "
        "newest valid version when model-updates announces none that loads.",
    )
    signing_key: SecretStr | None = Field(
        default=None,
        description="Shared secret of the trainer's STREAMREC_TRAINER_SIGNING_KEY: when set, a version "
        "whose manifest signature (HMAC-SHA256) is missing or wrong is refused (unset = not checked).",
    )
    group_id: str = Field(
        default="streamrec-serving", min_length=1,
        description="Consumer group of rec-requests: agents in one group share the requests.",
    )
    request_offset_reset: Literal["earliest", "latest"] = Field(
        default="earliest",
        description="Where a new group starts in rec-requests (earliest: requests produced "
        "before the first agent started are answered too).",
    )

    # --- batching and inference -----------------------------------------------------------
    max_batch: int = Field(
        default=256, ge=1, le=65_536,
        description="Most requests scored in one micro-batch (a batch is whatever has arrived "
        "while the previous one was scored: no waiting at low load).",
    )
    max_queued: int = Field(
        default=20_000, ge=1,
        description="Requests fetched but not yet scored before fetching pauses (backpressure).",
    )
    history_length: int = Field(
        default=50, ge=1, le=10_000,
        description="Most recent history items kept per user (the user tower reads at most "
        "the model's max_history of them).",
    )
    encode_batch: int = Field(
        default=4096, ge=1,
        description="Item texts per item-tower call when computing item vectors (shortest first; "
        "the tower pads and chunks each call by its own encode_chunk).",
    )
    prefix_cache_items: int = Field(
        default=20_000, ge=0,
        description="Items whose frozen-encoder-prefix states are kept across versions, so a swap "
        "re-runs only the trainable layers (used when the model freezes layers; 0 = off).",
    )
    warm_start: bool = Field(
        default=True,
        description="While no version is live, build the default model once in the loader thread (imports, "
        "encoder weights read, the catalog's frozen-encoder states put in the prefix cache), so that the "
        "first version swaps in seconds sooner (make loop: 6.8 s before).",
    )
    loader_nice: int = Field(
        default=10, ge=0, le=19,
        description="Niceness added to the background thread that loads versions and computes item "
        "vectors (Linux), so scoring and Kafka I/O preempt it (0 = same priority).",
    )
    device: str = Field(
        default="cpu", description="Torch device for inference: cpu, cuda, cuda:N, or auto."
    )
    torch_threads: int = Field(
        default=1, ge=0, le=1024,
        description="torch.set_num_threads for the agent (0 = torch's default).  1 by default: "
        "scoring batches are small, and spinning OpenMP workers fight the Kafka client and "
        "broker threads for the cores (25x slower small batches measured on 2 busy cores).",
    )
    linger_ms: float = Field(
        default=1.0, ge=0.0, le=1000.0,
        description="Producer linger for recommendations (latency vs. batching).",
    )

    # --- the per-user posterior, refreshed from labeled -------------------------------------
    posterior_refresh: bool = Field(
        default=True,
        description="Follow the labeled topic and add to the live version's per-user posterior means what "
        "the labels the version has not learned yet say, by the trainer's Bayes rule (serving/refresh.py): "
        "a user's clicks count as soon as the join labels them, not at the next version.  It learns on the "
        "scoring thread.  make loop's greedy arm: 7,976, 8,417 and 7,704 clicks of 14,338 with it, 7,255 and 7,337 without "
        "(in process, versions every 300 requests: last windows 0.759 / 0.789 -> 0.818 / 0.886 of optimal); "
        "the MovieLens demo, model - fallback hit rate, three runs each: -0.013, +0.051, +0.016 with it, "
        "+0.071, +0.007, +0.013 without (each +- 0.02).",
    )
    posterior_refresh_s: float = Field(
        default=0.5, gt=0.0, le=60.0,
        description="Least time between two refreshes (a slate's labels, which the join emits together, "
        "are then learned in one update, as the trainer's batch learns them).",
    )
    posterior_replay: int = Field(
        default=100_000, ge=0,
        description="Records of each labeled partition read back at start-up (the posterior forgets: "
        "a user's recent labels are what it holds).",
    )

    # --- fallback and cold start -------------------------------------------------------------
    popularity_half_life_s: float = Field(
        default=3600.0, gt=0.0,
        description="Half-life (event time) of a click's weight in the popularity fallback.",
    )
    popularity_refresh_s: float = Field(
        default=1.0, ge=0.0,
        description="How stale the cached popularity / cold-start scores may get (0 = per batch).",
    )
    trending_items: int = Field(
        default=20, ge=1,
        description="Most popular items whose text centroid new users are matched against.",
    )
    cold_start_blend: float = Field(
        default=0.5, ge=0.0, le=1.0,
        description="New users: score = (1 - blend) * popularity + blend * text similarity "
        "to the trending items (both scaled to [0, 1]).",
    )

    # --- free-text queries ----------------------------------------------------------------------
    query_model_weight: float = Field(
        default=0.5, ge=0.0, le=1.0,
        description="Requests with a query from a user with history: score = (1 - w) * z(query-item "
        "cosine) + w * z(model score), each z-scored over the request's candidates (0 = the query "
        "alone, 1 = the model alone; 0.5 chosen by measurement on MovieLens, benchmarks/zero_shot.py).",
    )
    query_cache_size: int = Field(
        default=10_000, ge=1, le=10_000_000,
        description="Encoded queries kept (least recently used forgotten first; each holds one "
        "encoder-width float vector).",
    )

    # --- exploration ---------------------------------------------------------------------------
    explore: Literal["off", "epsilon", "softmax"] = Field(
        default="off",
        description="off: greedy top-k; epsilon: epsilon-greedy per position; softmax: "
        "Plackett-Luce sampling at explore_temperature.  Each shown item carries its propensity.",
    )
    explore_epsilon: float = Field(
        default=0.1, ge=0.0, le=1.0, description="Probability of a uniform pick per position (epsilon)."
    )
    explore_temperature: float = Field(
        default=1.0, gt=0.0, description="Softmax temperature over the scores (softmax)."
    )
    explore_pool: int = Field(
        default=50, ge=1,
        description="Exploration samples among the top max(k, explore_pool) candidates.",
    )
    explore_seed: int = Field(
        default=0, description="Seed of the exploration RNG (mixed with each request_id: reproducible)."
    )

    # --- operations ------------------------------------------------------------------------------
    metrics_port: int = Field(
        default=0, ge=0, le=65_535, description="Prometheus /metrics port (0 = off)."
    )
    startup_timeout_s: float = Field(
        default=120.0, gt=0.0,
        description="Longest wait for reading the compacted topics up to their end at start-up.",
    )

    @model_validator(mode="after")
    def _explore_can_explore(self) -> ServingSettings:
        if self.explore == "epsilon" and self.explore_epsilon == 0.0:
            raise ValueError("explore_epsilon: must be > 0 when explore=epsilon (or set explore=off)")
        return self

RENAMED_ENV: dict[str, str] = {f"{ENV_PREFIX}HISTORY_LEN": f"{ENV_PREFIX}HISTORY_LENGTH"}
"""Old environment names -> their new ones: a set old name stops the agent at start-up (not ignored)."""


def check_renamed(environ: Mapping[str, str] | None = None) -> None:
    """ConfigError naming an old environment variable that is still set (see :data:`RENAMED_ENV`)."""
    env = os.environ if environ is None else environ
    for old, new in RENAMED_ENV.items():
        if old in env:
            raise ConfigError(old, f"was renamed: set {new} instead")


def serving_device(name: str) -> torch.device:
    """The torch device of ``name`` (:func:`trainer.device.resolve_device`), or ConfigError naming
    STREAMREC_SERVING_DEVICE."""
    # Imported here, not at the top: torch takes seconds to import, and `python -m serving --help`
    # and the README's settings table import this module without needing it.
    from trainer.device import DeviceError, resolve_device

    try:
        return resolve_device(name)
    except DeviceError as exc:
        raise ConfigError(f"{ENV_PREFIX}DEVICE", str(exc)) from None


def check_runtime(settings: ServingSettings) -> torch.device:
    """Checks that need the machine; returns the resolved device, or raises ConfigError."""
    from trainer.weights import WeightsError, WeightStore  # torch again: see serving_device

    device = serving_device(settings.device)
    try:
        WeightStore(settings.weights_root)
    except WeightsError as exc:
        raise ConfigError(f"{ENV_PREFIX}WEIGHTS_ROOT", str(exc)) from None
    return device
