"""What rebuilds a model: :class:`ModelConfig` (JSON), and the stable hashing of ids to rows."""

from __future__ import annotations

import hashlib
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from contract.errors import StreamrecError


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
        description="Local folder or Hugging Face name of a BERT-family encoder; "
        "None or 'default' = the offline all-MiniLM-L6-v2 (infra.assets.model_path()).",
    )
    encoder_layers: int | None = Field(
        default=None, ge=1, description="Keep only the first N layers (real weights); None = all."
    )
    max_text_len: int = Field(default=32, ge=4, le=512, description="Tokens per item text.")
    pooling: Literal["mean", "cls"] = "mean"
    embed_dim: int = Field(default=64, ge=8, description="Width of item and user vectors (+1 bias column).")
    user_tower: Literal["attention", "mean"] = "mean"
    attention_heads: int = Field(default=4, ge=1)
    max_history: int = Field(default=20, ge=0, description="History items the user tower reads.")
    user_buckets: int = Field(
        default=16_384, ge=0, description="Hashed user-id embedding and bias rows (unseen users need no new row); 0 = off."
    )
    item_buckets: int = Field(
        default=16_384,
        ge=0,
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
    categories: list[str] = Field(
        default_factory=list, description="Category names of the category head; empty = no head."
    )
    value_head: bool = False
    task_weights: TaskWeights = Field(default_factory=TaskWeights)
    freeze_layers: int = Field(
        default=64,
        ge=-64,
        description="Freeze the embeddings and the lower N encoder layers; their per-item output is "
        "cached.  >= the layer count: the whole encoder (the default: each item's pooled vector is "
        "computed once, and the projection, ids and towers learn on it; on the evaluation streams tuning "
        "the top layer cost 2-5x the time for no AUC gain); negative: all but the top |N| layers.",
    )
    lora_rank: int = Field(default=0, ge=0, description="LoRA adapters on the unfrozen layers; 0 = off.")
    lora_alpha: float = Field(default=16.0, gt=0.0)
    lora_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    lora_targets: list[str] = Field(default_factory=lambda: ["query", "key", "value", "dense"])
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
    encode_chunk: int = Field(default=256, ge=1, description="Items per encoder call (length-sorted).")
    seed: int = Field(default=0, description="Seeds the initialisation of the new parameters.")

    @field_validator("categories")
    @classmethod
    def _unique_categories(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("category names must be unique")
        return v

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


def user_bucket(user_id: str, buckets: int) -> int:
    """The hash bucket of a user id."""
    return id_bucket(user_id, buckets)


def item_bucket(item_id: str, buckets: int) -> int:
    """The hash bucket of an item id (salted, so an item and a user of the same id differ)."""
    return id_bucket("item:" + item_id, buckets)
