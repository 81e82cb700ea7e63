"""Settings of the trainer service, read once from the environment (prefix ``STREAMREC_TRAINER_``).

Kafka connection settings are the shared :class:`contract.settings.KafkaSettings`
(prefix ``STREAMREC_``); everything specific to the trainer lives here.  Build
it with ``contract.settings.load(TrainerSettings)``: a setting that cannot work
raises :class:`~contract.errors.ConfigError` naming the environment variable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from contract.settings import default_cache_dir

ENV_PREFIX = "STREAMREC_TRAINER_"


def _default_weights_root() -> str:
    return str(default_cache_dir() / "weights")


def _default_checkpoint_dir() -> Path:
    return default_cache_dir() / "trainer"


class TrainerSettings(BaseSettings):
    """Everything the trainer service can be told; see ``python -m trainer --help``.

    Model and learner fields: the model's config (:class:`trainer.model_config.ModelConfig`)
    is ``STREAMREC_TRAINER_MODEL_OPTIONS`` (a JSON object of any of its fields) with these
    individual variables on top: ``ENCODER_PATH`` (field ``encoder``), ``ENCODER_LAYERS``,
    ``FREEZE_LAYERS``, ``LORA_RANK``, ``MAX_TEXT_LEN``, ``CATEGORIES``, ``EMBED_DIM`` and
    ``HISTORY_LENGTH`` (field ``max_history``), and ``SEED``.  The learner's
    (:class:`trainer.learner.LearnerConfig`) is ``STREAMREC_TRAINER_LEARNER_OPTIONS`` with
    ``LR_IDS``, ``LR_TOWERS``, ``UPDATES_PER_BATCH``, ``REPLAY_SIZE``, ``DISTILL_WEIGHT``,
    ``DEVICE`` and ``SEED`` on top.  An individual variable, when set, overrides the same
    field of the JSON object; a value either rejects names the variable it came from.
    Redelivered examples are dropped by the service's feed (``DEDUPE_WINDOW``), so the
    learner option ``dedup_window`` is refused.

    Schedules: a version is attempted every ``PUBLISH_EVERY_STEPS`` steps or
    ``PUBLISH_EVERY_S`` seconds; a checkpoint is written at every publish, every
    ``CHECKPOINT_EVERY_STEPS`` steps, and, when no step moved the offsets (duplicates,
    dead letters, held-back examples only) and nothing is queued, after
    ``CHECKPOINT_EVERY_S`` seconds.
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="ignore")

    # --- identity and storage -------------------------------------------------------
    model_name: str = Field(
        default="streamrec", min_length=1, max_length=256,
        description="Model name: the key of its records on model-updates.",
    )
    weights_root: str = Field(
        default_factory=_default_weights_root,
        description="Weight store root: a directory or an fsspec URL (default <cache>/weights).",
    )
    signing_key: SecretStr | None = Field(
        default=None,
        description="Shared secret: each published version gets an HMAC-SHA256 signature of its manifest "
        "(manifest.json.sig), which agents configured with the same key require (unset = unsigned).",
    )
    checkpoint_dir: Path = Field(
        default_factory=_default_checkpoint_dir,
        description="Directory of the trainer checkpoint (default <cache>/trainer).",
    )
    group_id: str = Field(
        default="streamrec-trainer", min_length=1,
        description="Consumer group the trained-up-to offsets are committed under (for lag monitoring).",
    )
    start_offset: Literal["earliest", "latest"] = Field(
        default="earliest",
        description="Where to start in a labeled partition the checkpoint does not cover.",
    )

    # --- batching -------------------------------------------------------------------------
    batch_size: int = Field(
        default=1024, ge=1, le=65_536,
        description="Examples per training step (at most; a smaller one after max_batch_wait_s).",
    )
    max_batch_wait_s: float = Field(
        default=1.0, gt=0, le=3600,
        description="Train a smaller batch once its oldest example has waited this long.",
    )
    dedupe_window: int = Field(
        default=100_000, ge=0, le=10_000_000,
        description="Recent example_ids remembered to drop redelivered examples (0 = off).",
    )
    missing_item_wait_s: float = Field(
        default=30.0, ge=0, le=86_400,
        description="How long an example whose item is not in the catalog yet waits for it "
        "(its partition waits behind it) before it goes to dead-letters.",
    )
    max_queued_per_partition: int = Field(
        default=10_000, ge=1,
        description="Fetched but untrained examples per partition before it is paused (backpressure).",
    )

    # --- publishing and guardrail ----------------------------------------------------------
    publish_every_steps: int = Field(default=50, ge=1, description="Publish after this many steps...")
    publish_every_s: float = Field(
        default=5.0, gt=0, description="...or this many seconds since the last publish, whichever first."
    )
    publish_kind: Literal["full", "delta"] = Field(
        default="delta",
        description="delta: only the tensors that changed since the last full version (the first "
        "version, every full_every-th, and any whose delta would be at least half the full size are "
        "full); full: the whole state dict every time.",
    )
    full_every: int = Field(
        default=10, ge=1, description="With publish_kind=delta, every N-th version is full (bounds chains)."
    )
    init_from: str | None = Field(
        default=None,
        description="Start a fresh trainer (no checkpoint) from another deployment's published version: "
        "its version directory or manifest.json, a path or fsspec URL (e.g. /srv/weights/v000024). "
        "The model settings must match its config (categories and seed are taken from it); a "
        "checkpoint, when present, wins.",
    )
    keep_versions: int = Field(
        default=10, ge=0, description="Versions kept in the weight store (older pruned; 0 = keep all)."
    )
    holdout_fraction: float = Field(
        default=0.1, ge=0.0, lt=1.0,
        description="Fraction of examples held back from training for the guardrail (0 = no guardrail).",
    )
    holdout_size: int = Field(
        default=2000, ge=1,
        description="Most recent held-back examples the guardrail evaluates on (500 held a first version "
        "that beat popularity by 0.07 AUC back for half of the closed loop's run: its paired se was 0.06).",
    )
    guardrail_min_examples: int = Field(
        default=32, ge=1,
        description="Held-back examples needed before a candidate can replace a live version.",
    )
    guardrail_metric: Literal["log_loss", "auc"] = Field(
        default="log_loss", description="Metric the guardrail compares (log_loss: lower is better)."
    )
    guardrail_margin: float = Field(
        default=0.01, ge=0.0,
        description="A candidate passes when it is at most this much worse than the live version...",
    )
    guardrail_z: float = Field(
        default=1.64, ge=0.0,
        description="...plus this many standard errors of the paired log-loss difference "
        "(log_loss only; 0 = the margin alone).",
    )
    guardrail_fallback_z: float = Field(
        default=1.64, ge=0.0,
        description="With no live version, a candidate replaces the popularity fallback only when its "
        "held-back AUC beats the fallback's by more than this many standard errors of the paired "
        "AUC difference (DeLong); 0 = any improvement.",
    )
    fallback_half_life_s: float = Field(
        default=3600.0, gt=0,
        description="Half-life of the trainer's copy of the popularity fallback (fed by the positives "
        "it trains on); keep it equal to STREAMREC_SERVING_POPULARITY_HALF_LIFE_S.",
    )

    # --- logged exploration: off-policy evaluation and learning (trainer/ope.py) -------------
    ope_gate: Literal["off", "report", "on"] = Field(
        default="off",
        description="Off-policy evaluation of each candidate's top-1 policy (its best item over the "
        "catalog) on held-back exploration examples at position 0 (those with a propensity): report = "
        "estimates in the manifest (ope_*); on = also refuse a candidate that is worse than the live "
        "version by more than ope_margin + ope_z standard errors of the paired estimate (worse_by_ope).",
    )
    ope_estimator: Literal["snips", "dr", "ips"] = Field(
        default="snips",
        description="Estimator the OPE gate compares (dr: the live version's predictions are the reward model).",
    )
    ope_margin: float = Field(
        default=0.0, ge=0.0, description="Click-rate slack the OPE gate allows a candidate below the live version..."
    )
    ope_z: float = Field(
        default=1.64, ge=0.0, description="...plus this many standard errors of the paired difference."
    )
    ope_min_examples: int = Field(
        default=200, ge=1,
        description="Held-back exploration examples (position 0, with a propensity) the OPE gate needs "
        "before it judges (fewer: estimates only, never a refusal).",
    )
    ope_holdout_size: int = Field(
        default=5000, ge=1, description="Most recent held-back exploration examples the OPE gate keeps."
    )
    ope_clip: float = Field(
        default=0.0, ge=0.0, description="Importance-weight cap of the OPE estimates (0 = none; else >= 1)."
    )
    ipw_clip: float = Field(
        default=0.0, ge=0.0,
        description="Inverse-propensity weighting of the click loss: each example with a logged propensity "
        "p weighs min(1/p, this) (examples without one weigh 1); 0 = off, else >= 1.",
    )

    # --- checkpoints ----------------------------------------------------------------------
    checkpoint_every_steps: int = Field(
        default=100, ge=1, description="Checkpoint after this many steps (and at every publish)."
    )
    checkpoint_every_s: float = Field(
        default=5.0, gt=0,
        description="Checkpoint an idle trainer (nothing queued) whose offsets moved without a step "
        "(duplicates, dead letters, held-back examples only) this many seconds after the last checkpoint.",
    )

    # --- model ----------------------------------------------------------------------------
    encoder_path: str | None = Field(
        default=None,
        description="Local path or Hugging Face name of the encoder (default: the offline all-MiniLM-L6-v2).",
    )
    encoder_layers: int | None = Field(
        default=None, ge=1, le=48, description="Keep only the first N encoder layers (1 = test-sized)."
    )
    freeze_layers: int | None = Field(
        default=None, ge=0, le=48,
        description="Freeze the embeddings and the lowest N encoder layers (default: the whole encoder; "
        "the top layers then learn on cached outputs of the rest).",
    )
    lora_rank: int | None = Field(default=None, ge=0, le=256, description="LoRA rank on attention (0 = off).")
    max_text_len: int | None = Field(
        default=None, ge=4, le=512, description="Item text tokens fed to the encoder."
    )
    categories: list[str] | None = Field(
        default=None,
        description="Category names of the category head, as a JSON list (default: the catalog's "
        "categories when a model starts fresh, the checkpoint's when it resumes).",
    )
    embed_dim: int | None = Field(default=None, description="Width of the item and user vectors (ModelConfig.embed_dim).")
    history_length: int | None = Field(
        default=None, description="History items the user tower reads (ModelConfig.max_history)."
    )
    model_options: dict[str, Any] = Field(
        default_factory=dict,
        description='Any other ModelConfig field, as a JSON object, e.g. {"user_tower": "attention"}; '
        "the individual model variables override its fields.",
    )

    # --- learner --------------------------------------------------------------------------
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="auto (CUDA with bf16 autocast when present, else CPU), cpu or cuda."
    )
    torch_threads: int = Field(
        default=0, ge=0, le=1024,
        description="torch.set_num_threads for the trainer on CPU (0 = torch's default, one per core).",
    )
    seed: int = Field(default=0, ge=0, description="Seed of the model init, learner RNG and hold-back choice.")
    lr_ids: float | None = Field(
        default=None,
        description="Adagrad lr of the item-id biases when they are not the per-item posterior's "
        '(LearnerConfig.lr_ids; learner_options {"item_bias_prior_stds": []} turns that posterior off; '
        "the user rows learn at lr_user_ids, 0.02, set through learner_options).",
    )
    lr_towers: float | None = Field(
        default=None, description="AdamW lr of the projection and the user tower (LearnerConfig.lr_towers)."
    )
    updates_per_batch: int | None = Field(
        default=None, description="Optimizer steps on each batch (LearnerConfig.updates_per_batch)."
    )
    replay_size: int | None = Field(
        default=None, description="Replay reservoir capacity; 0 = no replay (LearnerConfig.replay_size)."
    )
    distill_weight: float | None = Field(
        default=None, description="Weight of distillation towards the live version; 0 = off (LearnerConfig.distill_weight)."
    )
    learner_options: dict[str, Any] = Field(
        default_factory=dict,
        description='Any other LearnerConfig field, as a JSON object, e.g. {"lr_heads": 0.003}; '
        "the individual learner variables override its fields.",
    )

    # --- operations -----------------------------------------------------------------------
    metrics_port: int = Field(
        default=9101, ge=0, le=65_535, description="Prometheus metrics port (0 = off)."
    )
    log_every_s: float = Field(default=10.0, gt=0, description="Seconds between progress log lines.")
    trained_ids_log: Path | None = Field(
        default=None,
        description="Debug: append every trained (T) and held-back (H) example_id to this file; "
        "rolled back to the checkpoint on restart, so it lists exactly the checkpointed lineage "
        "(rank r of a data-parallel trainer writes <path>.rank<r>).",
    )
    ddp_timeout_s: float = Field(
        default=300.0, gt=0, le=86_400,
        description="Data-parallel trainer (torchrun --nproc-per-node N -m trainer): how long a rank waits "
        "in a collective for the others before the group stops (a rank that dies stops it at once).",
    )

    @field_validator("weights_root")
    @classmethod
    def _root(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("must not be empty")
        return v

    @field_validator("init_from")
    @classmethod
    def _init_from(cls, v: str | None) -> str | None:
        if v is None:
            return None
        v = v.strip()
        return v or None

    @model_validator(mode="after")
    def _consistent(self) -> TrainerSettings:
        if (
            self.freeze_layers is not None
            and self.encoder_layers is not None
            and self.freeze_layers > self.encoder_layers
        ):
            raise ValueError(
                f"freeze_layers: {self.freeze_layers} exceeds encoder_layers ({self.encoder_layers})"
            )
        for name in ("ipw_clip", "ope_clip"):
            if 0 < getattr(self, name) < 1:
                raise ValueError(f"{name}: {getattr(self, name)} caps every weight below 1; use 0 (off) or >= 1")
        if self.holdout_fraction > 0 and self.guardrail_min_examples > self.holdout_size:
            raise ValueError(
                f"guardrail_min_examples: {self.guardrail_min_examples} exceeds holdout_size "
                f"({self.holdout_size}), so no version could ever pass the guardrail"
            )
        return self

    def model_overrides(self) -> dict[str, Any]:
        """The model fields given explicitly (the rest keep ModelConfig's defaults)."""
        out = dict(self.model_options)
        for setting, field in MODEL_SETTINGS.items():
            if getattr(self, setting) is not None:
                out[field] = getattr(self, setting)
        out.setdefault("seed", self.seed)
        return out

    def learner_overrides(self) -> dict[str, Any]:
        """The learner fields given explicitly (the rest keep LearnerConfig's defaults)."""
        out = dict(self.learner_options)
        for setting, field in LEARNER_SETTINGS.items():
            if getattr(self, setting) is not None:
                out[field] = getattr(self, setting)
        out.setdefault("device", self.device)
        out.setdefault("seed", self.seed)
        return out

    def model_setting(self, field: str) -> str:
        """The environment variable a ModelConfig field came from (for an error about it)."""
        return _setting_of(self, field, MODEL_SETTINGS, self.model_options, "model_options")

    def learner_setting(self, field: str) -> str:
        """The environment variable a LearnerConfig field came from (for an error about it)."""
        return _setting_of(self, field, LEARNER_SETTINGS, self.learner_options, "learner_options")


MODEL_SETTINGS = {"encoder_path": "encoder", "encoder_layers": "encoder_layers",
                  "freeze_layers": "freeze_layers", "lora_rank": "lora_rank",
                  "max_text_len": "max_text_len", "categories": "categories",
                  "embed_dim": "embed_dim", "history_length": "max_history"}
"""Trainer setting -> the ModelConfig field it sets (over MODEL_OPTIONS); ``seed`` too, when the blob lacks it."""
LEARNER_SETTINGS = {"lr_ids": "lr_ids", "lr_towers": "lr_towers", "updates_per_batch": "updates_per_batch",
                    "replay_size": "replay_size", "distill_weight": "distill_weight"}
"""Trainer setting -> the LearnerConfig field it sets (over LEARNER_OPTIONS); ``device`` and ``seed`` too."""


def _setting_of(
    settings: TrainerSettings, field: str, table: dict[str, str], blob: dict[str, Any], blob_name: str
) -> str:
    for setting, f in table.items():
        if f == field and getattr(settings, setting) is not None:
            return f"{ENV_PREFIX}{setting}".upper()
    if field in ("seed", "device") and field not in blob:
        return f"{ENV_PREFIX}{field}".upper()
    return f"{ENV_PREFIX}{blob_name}".upper()
