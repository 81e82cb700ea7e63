"""What rebuilds a model: :class:`ModelConfig` (JSON), and the stable hashing of ids to rows."""

from __future__ import annotations

import functools
import hashlib
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from contract.errors import StreamrecError

MAX_LAYERS = 64
"""Most encoder layers a config keeps or freezes (BERT-family models have 2-48)."""
MAX_BUCKETS = 1 << 22
"""Most hashed id rows per table (4,194,304): a bound on what a config (a manifest) makes serving allocate."""
MAX_ID_PARAMETERS = 1 << 30
"""Most id-table parameters, (user_buckets + item_buckets) x (embed_dim + 1): 4 GiB of float32."""


class ModelError(StreamrecError):
    """A model that cannot be built or used as configured."""


# --------------------------------------------------------------------------- config
class TaskWeights(BaseModel):
    """Weight of each task's loss in the total."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    click: float = Field(default=1.0, ge=0.0)
    category: float = Field(default=0.2, ge=0.0)
    value: float = Field(default=0.1, ge=0.0)


class ModelConfig(BaseModel):
    """Everything needed to rebuild a :class:`RecModel` (JSON-serialisable)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    encoder: str | None = Field(
        default=None,
        max_length=4096,
        description="Local folder or Hugging Face name of a BERT-family encoder; "
        "None or 'default' = the offline all-MiniLM-L6-v2 (infra.assets.model_path()).",
    )
    encoder_layers: int | None = Field(
        default=None, ge=1, le=MAX_LAYERS, description="Keep only the first N layers (real weights); None = all."
    )
    max_text_len: int = Field(default=32, ge=4, le=512, description="Tokens per item text.")
    pooling: Literal["mean", "cls"] = "mean"
    embed_dim: int = Field(default=64, ge=8, le=4096, description="Width of item and user vectors (+1 bias column).")
    user_tower: Literal["attention", "mean"] = "mean"
    attention_heads: int = Field(default=4, ge=1, le=64)
    max_history: int = Field(default=20, ge=0, le=10_000, description="History items the user tower reads.")
    user_buckets: int = Field(
        default=16_384, ge=0, le=MAX_BUCKETS, description="Hashed user-id embedding and bias rows (unseen users need no new row); 0 = off."
    )
    item_buckets: int = Field(
        default=16_384,
        ge=0,
        le=MAX_BUCKETS,
        description="Hashed item-id embedding and bias rows, added to the text vector (popularity and "
        "collaborative signal a title cannot carry); 0 = off (text only).",
    )
    category_features: bool = Field(
        default=True,
        description="Add a learned embedding of the item's categories (of ``categories``) to its vector: "
        "with the user embedding it learns each user's taste per category.",
    )
    center_text: bool = Field(
        default=True,
        description="Centre the pooled text vectors before the projection (the learner sets the "
        "projection's bias from the catalog's mean text vector at its first step): frozen sentence "
        "vectors share one dominant direction that would otherwise swamp the cosine.",
    )
    text_basis: Literal["random", "principal"] = Field(
        default="principal",
        description="With center_text: start the projection on the catalog's principal text directions, "
        "weighted by their singular values (see ItemTower._principal_weight), instead of a random one.",
    )
    categories: list[Annotated[str, Field(max_length=256)]] = Field(
        default_factory=list, max_length=10_000, description="Category names of the category head; empty = no head."
    )
    value_head: bool = False
    task_weights: TaskWeights = Field(default_factory=TaskWeights)
    freeze_layers: int = Field(
        default=64,
        ge=-MAX_LAYERS,
        le=MAX_LAYERS,
        description="Freeze the embeddings and the lower N encoder layers; their per-item output is "
        "cached.  >= the layer count: the whole encoder (the default: each item's pooled vector is "
        "computed once, and the projection, ids and towers learn on it; on the evaluation streams tuning "
        "the top layer cost 2-5x the time for no AUC gain); negative: all but the top |N| layers.",
    )
    lora_rank: int = Field(default=0, ge=0, le=1024, description="LoRA adapters on the unfrozen layers; 0 = off.")
    lora_alpha: float = Field(default=16.0, gt=0.0)
    lora_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    lora_targets: list[Annotated[str, Field(max_length=256)]] = Field(
        default_factory=lambda: ["query", "key", "value", "dense"], max_length=64
    )
    dropout: float = Field(
        default=0.0,
        ge=0.0,
        lt=1.0,
        description="Dropout of the towers, heads and unfrozen encoder layers.  0 lets the "
        "learner score (prequential) and train with one forward pass.",
    )
    init_ctr: float = Field(
        default=0.1, gt=0.0, lt=1.0, description="Click rate the click head starts at (its bias = log odds)."
    )
    history_scale: float = Field(
        default=5.0,
        gt=0.0,
        le=100.0,
        description="Initial weight of the cosine between the user's history and the candidate in the "
        "logit (learned, at most 100).  Large ranks well early but is overconfident: 10 -> 5 cost the "
        "synthetic stream 0.003 AUC and gained 0.044 log loss there, MovieLens-20k +0.003 AUC; in the closed "
        "loop the explore arm's first version passed the guardrail at request ~400 and ~900 (two runs) where "
        "with 10 it did at ~1,600 (two runs).",
    )
    position_slots: int = Field(
        default=0,
        ge=0,
        le=1024,
        description="Position as a train-time-only input (a shallow position tower): the click loss adds a "
        "learned logit per slate position (positions >= N-1 share the last) to the model's, so that "
        "what the position explains (users look at the top) is not learned as relevance; a score holds "
        "the top position's term only (the click logit at the top of the slate).  0 = off (the default: "
        "+0.014 of optimal with clicks falling as 0.8^position, a small cost without a position effect; "
        "benchmarks/logged_feedback.py).",
    )
    user_posterior_dims: int = Field(
        default=8,
        ge=0,
        le=256,
        description="Per-user posterior over low-dimensional item features (trainer/posterior.py): "
        "the top N principal directions of the catalog's centred text vectors, plus the item's "
        "categories with user_posterior_categories; each user's weights on them are a Bayesian "
        "logistic regression fitted by Newton steps on the user's own labels (a per-user random "
        "effect, as in GLMix), read by serving as part of the user vector.  0 (and no categories) = off.",
    )
    user_posterior_categories: bool = Field(
        default=True, description="The item's categories (of ``categories``) are features of the per-user posterior."
    )
    encode_chunk: int = Field(default=256, ge=1, le=65_536, description="Items per encoder call (length-sorted).")
    seed: int = Field(default=0, description="Seeds the initialisation of the new parameters.")

    @field_validator("categories")
    @classmethod
    def _unique_categories(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("category names must be unique")
        return v

    @property
    def posterior_width(self) -> int:
        """Features of the per-user posterior (0 = off): text directions + categories; none without user rows."""
        if not self.user_buckets:
            return 0
        cats = len(self.categories) if self.user_posterior_categories else 0
        return self.user_posterior_dims + cats

    @model_validator(mode="after")
    def _posterior_needs_centring(self) -> ModelConfig:
        if self.user_posterior_dims and not self.center_text:
            raise ValueError(
                "user_posterior_dims > 0 needs center_text (its text directions are the centred catalog's); "
                "set user_posterior_dims=0 or center_text=true"
            )
        return self

    @model_validator(mode="after")
    def _id_tables_fit(self) -> ModelConfig:
        params = (self.user_buckets + self.item_buckets) * (self.embed_dim + 1) + self.user_buckets * self.posterior_width
        if params > MAX_ID_PARAMETERS:
            raise ValueError(
                f"(user_buckets + item_buckets) x (embed_dim + 1) = {params} id parameters, at most {MAX_ID_PARAMETERS}"
            )
        return self

    @field_validator("encoder")
    @classmethod
    def _encoder_name(cls, v: str | None) -> str | None:
        return None if v in (None, "", "default") else v


def resolve_encoder(name: str | None) -> str:
    """The encoder folder or name to load: the offline default when ``name`` is None."""
    if name is None:
        from infra.assets import model_path

        return str(model_path())
    return name


def frozen_layer_count(freeze_layers: int, n_layers: int) -> int:
    """How many lower layers ``freeze_layers`` freezes in an encoder of ``n_layers``."""
    if freeze_layers < 0:
        return max(n_layers + freeze_layers, 0)
    return min(freeze_layers, n_layers)


def id_bucket(key: str, buckets: int) -> int:
    """A stable hash bucket of an id (the same in every process and version)."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % buckets


BUCKET_CACHE = 1 << 20
"""Ids whose bucket each of :func:`user_bucket` and :func:`item_bucket` remembers (every forward pass
hashes its batch's ids; least recently used forgotten first)."""


@functools.lru_cache(maxsize=BUCKET_CACHE)
def user_bucket(user_id: str, buckets: int) -> int:
    """The hash bucket of a user id."""
    return id_bucket(user_id, buckets)


@functools.lru_cache(maxsize=BUCKET_CACHE)
def item_bucket(item_id: str, buckets: int) -> int:
    """The hash bucket of an item id (salted, so an item and a user of the same id differ)."""
    return id_bucket("item:" + item_id, buckets)
