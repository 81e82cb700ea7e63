"""The multi-task two-tower recommender, built from named parts.

- :class:`ItemTower`: a pretrained BERT-family encoder over the item text
  (mean or CLS pooling), centred on the catalog's mean text vector, and a
  projection to ``embed_dim``.  The lower ``freeze_layers`` layers (and the
  embeddings; by default the whole encoder) are frozen; their output per
  item is then cached in a :class:`PrefixCache`, so a frozen prefix is never
  recomputed.  LoRA adapters (``peft``) can be put on the layers above.
- :class:`RecModel` adds what a title cannot carry: hashed item-id
  embeddings and per-item biases, category embeddings, per-user biases
  (hashing: an unseen id needs no new row).
- :class:`UserTower`: mean pooling (or attention with a learned query) over
  the vectors of the user's history items, with a learned recency
  embedding, a "no history" slot, and a hashed user embedding.
- Heads: :class:`ClickHead` (click probability = dot product of the two
  towers' augmented vectors: ``scale * cos(taste, item) + e_user . item +
  biases``; the same formula scores all pairs for serving),
  :class:`CategoryHead` (multi-label category/genre prediction from the item
  text), :class:`ValueHead` (regression of a click's value).

:class:`RecTrain` is the training wrapper: it takes a typed
:class:`~trainer.batching.Batch` and owns the losses and their task weights.

Everything needed to rebuild a model is in :class:`ModelConfig` (JSON), and
:func:`build_model` is deterministic: the same config gives the same
parameters (the heads are seeded), so a snapshot of the tensors that
training changed (the trainable parameters and the ``centred`` flag) is
enough to restore a model.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn

from streams.errors import StreamrecError
from trainer.batching import Batch
from trainer.catalog import text_hash

log = logging.getLogger(__name__)

ID_INIT_STD = 0.01
"""Initial scale of the id embeddings: small beside the text vectors, so text leads until ids learn."""
CATEGORY_INIT_STD = 0.05
"""Initial scale of the category embeddings: items of one category start a little alike."""
_BUCKET_CACHE = 1_000_000


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


# --------------------------------------------------------------------------- cache
class PrefixCache:
    """Bounded LRU of per-item encoder states below the trainable layers.

    An entry is keyed by item_id (or by the text hash when no id is given),
    remembers the hash of the text it was computed from (a changed text is a
    miss and replaces the entry) and holds either the hidden states after the
    last frozen layer, unpadded (``[tokens, hidden]``; the attention mask is
    all ones over exactly those tokens, so the length *is* the mask), or,
    when the whole encoder is frozen, the pooled encoder output (``[hidden]``).

    ``signature`` names the model prefix the entries belong to; attaching the
    cache to a model with another prefix empties it.
    """

    def __init__(self, capacity: int = 50_000, *, dtype: torch.dtype = torch.float32) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self.dtype = dtype
        self.signature: str | None = None
        self._entries: OrderedDict[str, tuple[str, Tensor]] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.invalidations = 0

    def get(self, key: str, text_digest: str) -> Tensor | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        if entry[0] != text_digest:
            del self._entries[key]
            self.invalidations += 1
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[1]

    def put(self, key: str, text_digest: str, value: Tensor) -> None:
        self._entries[key] = (text_digest, value.detach().to(self.dtype))
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def invalidate(self, key: str) -> None:
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def stats(self) -> dict[str, float]:
        total = self.hits + self.misses
        return {
            "entries": float(len(self)),
            "hits": float(self.hits),
            "misses": float(self.misses),
            "invalidations": float(self.invalidations),
            "hit_rate": self.hits / total if total else 0.0,
        }


# --------------------------------------------------------------------------- item tower
def _bidirectional_mask(config, hidden: Tensor, attention_mask: Tensor):  # noqa: ANN001, ANN202
    try:
        from transformers.masking_utils import create_bidirectional_mask
    except ImportError:  # transformers < 4.56: additive 4-d mask
        m = attention_mask[:, None, None, :].to(hidden.dtype)
        return (1.0 - m) * torch.finfo(hidden.dtype).min
    return create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=attention_mask)


class ItemTower(nn.Module):
    """Encoder over item texts -> pooled hidden state -> projection to ``embed_dim``."""

    TOKEN_CACHE = 200_000
    """Texts whose token ids are remembered (oldest forgotten first)."""

    def __init__(
        self,
        encoder: nn.Module,
        tokenizer,  # noqa: ANN001 - a transformers tokenizer
        *,
        embed_dim: int,
        max_text_len: int,
        pooling: Literal["mean", "cls"],
        freeze_layers: int,
        encode_chunk: int,
    ) -> None:
        super().__init__()
        embeddings = getattr(encoder, "embeddings", None)
        layers = getattr(getattr(encoder, "encoder", None), "layer", None)
        if embeddings is None or not isinstance(layers, nn.ModuleList):
            raise ModelError(
                f"{type(encoder).__name__} is not a BERT-family encoder (needs .embeddings and .encoder.layer)"
            )
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.hidden = int(encoder.config.hidden_size)
        self.n_layers = len(layers)
        self.frozen = frozen_layer_count(freeze_layers, self.n_layers)
        self.max_text_len = max_text_len
        self.pooling = pooling
        self.encode_chunk = encode_chunk
        self.proj = nn.Linear(self.hidden, embed_dim)
        self.register_buffer("centred", torch.zeros((), dtype=torch.bool))
        """Whether :meth:`center` has set the projection's bias (saved with the model)."""
        self.cache: PrefixCache | None = None
        self._signature = ""
        self._token_cache: dict[str, list[int]] = {}
        self.last_encode: dict[str, int] = {}
        """Work of the last call: items, tokens through the trainable layers, prefix tokens computed."""

    # --- parts ----------------------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        return self.encoder.encoder.layer  # type: ignore[return-value]

    def frozen_modules(self) -> list[nn.Module]:
        if self.frozen == 0:
            return []
        return [self.encoder.embeddings, *list(self.layers[: self.frozen])]

    def train(self, mode: bool = True) -> ItemTower:
        super().train(mode)
        for m in self.frozen_modules():  # a frozen prefix always runs as at inference (no dropout)
            m.eval()
        return self

    def attach_cache(self, cache: PrefixCache | None, signature: str) -> None:
        if cache is not None and cache.signature != signature:
            cache.clear()
            cache.signature = signature
        self.cache = cache
        self._signature = signature

    # --- encoding --------------------------------------------------------------
    def _tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (memoised: items repeat, and tokenizing is CPU work per step)."""
        cache = self._token_cache
        todo = [t for t in dict.fromkeys(texts) if t not in cache]
        if todo:
            enc = self.tokenizer(todo, truncation=True, max_length=self.max_text_len, padding=False)
            for t, ids in zip(todo, enc["input_ids"], strict=True):
                cache[t] = ids
            while len(cache) > self.TOKEN_CACHE:
                cache.pop(next(iter(cache)))
        return [cache[t] for t in texts]

    def _device(self) -> torch.device:
        return self.proj.weight.device

    def _pad_ids(self, ids: list[list[int]]) -> tuple[Tensor, Tensor]:
        lengths = [len(x) for x in ids]
        width = max(lengths)
        pad = self.tokenizer.pad_token_id or 0
        flat = [pad] * (len(ids) * width)
        for r, x in enumerate(ids):
            flat[r * width : r * width + len(x)] = x
        dev = self._device()
        out = torch.tensor(flat, dtype=torch.long).view(len(ids), width).to(dev, non_blocking=True)
        lens = torch.tensor(lengths, dtype=torch.long).to(dev, non_blocking=True)
        mask = (torch.arange(width, device=dev)[None, :] < lens[:, None]).long()
        return out, mask

    def _run(self, hidden: Tensor, mask: Tensor, start: int, stop: int) -> Tensor:
        if start >= stop:
            return hidden
        attn = _bidirectional_mask(self.encoder.config, hidden, mask)
        for layer in self.layers[start:stop]:
            out = layer(hidden, attn)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def _embed(self, ids: Tensor) -> Tensor:
        return self.encoder.embeddings(input_ids=ids, token_type_ids=torch.zeros_like(ids))

    def _pool(self, hidden: Tensor, mask: Tensor) -> Tensor:
        if self.pooling == "cls":
            return hidden[:, 0]
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)

    def _chunks(self, lengths: Sequence[int]) -> list[list[int]]:
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        return [order[i : i + self.encode_chunk] for i in range(0, len(order), self.encode_chunk)]

    def _prefix_states(self, ids: list[list[int]]) -> list[Tensor]:
        """Per item: hidden states after the frozen prefix (or the pooled output if all frozen)."""
        out: list[Tensor | None] = [None] * len(ids)
        with torch.no_grad():
            for chunk in self._chunks([len(x) for x in ids]):
                tok, mask = self._pad_ids([ids[i] for i in chunk])
                h = self._run(self._embed(tok), mask, 0, self.frozen)
                if self.frozen == self.n_layers:
                    pooled = self._pool(h, mask)
                    for r, i in enumerate(chunk):
                        out[i] = pooled[r]
                else:
                    for r, i in enumerate(chunk):
                        out[i] = h[r, : len(ids[i])]
        return out  # type: ignore[return-value]

    def encode_pooled(
        self,
        texts: Sequence[str],
        item_ids: Sequence[str] | None = None,
        text_hashes: Sequence[str] | None = None,
    ) -> Tensor:
        """Pooled encoder output ``[n, hidden]`` of each text."""
        n = len(texts)
        if n == 0:
            return torch.zeros((0, self.hidden), device=self._device())
        if self.frozen == 0:
            ids = self._tokenize(texts)
            n_tok = sum(len(x) for x in ids)
            self.last_encode = {"items": n, "tokens": n_tok, "prefix_tokens": 0}
            parts, index = [], []
            for chunk in self._chunks([len(x) for x in ids]):
                tok, mask = self._pad_ids([ids[i] for i in chunk])
                h = self._run(self._embed(tok), mask, 0, self.n_layers)
                parts.append(self._pool(h, mask))
                index.extend(chunk)
            return _unpermute(torch.cat(parts), index)

        states: list[Tensor | None] = [None] * n
        missing: list[int] = []
        keys: list[str] = []
        digests: list[str] = []
        if self.cache is not None:
            digests = list(text_hashes) if text_hashes is not None else [text_hash(t) for t in texts]
            keys = list(item_ids) if item_ids is not None else ["#" + d for d in digests]
            for i in range(n):
                states[i] = self.cache.get(keys[i], digests[i])
                if states[i] is None:
                    missing.append(i)
        else:
            missing = list(range(n))
        prefix_tokens = 0
        if missing:
            missing_ids = self._tokenize([texts[i] for i in missing])
            prefix_tokens = sum(len(x) for x in missing_ids)
            computed = self._prefix_states(missing_ids)
            for i, s in zip(missing, computed, strict=True):
                states[i] = s
                if self.cache is not None:
                    self.cache.put(keys[i], digests[i], s)

        dev, dtype = self._device(), self.proj.weight.dtype
        if self.frozen == self.n_layers:
            self.last_encode = {"items": n, "tokens": 0, "prefix_tokens": prefix_tokens}
            return torch.stack([s.to(dev, dtype) for s in states])  # type: ignore[union-attr]
        lengths_all = [s.shape[0] for s in states]  # type: ignore[union-attr]
        self.last_encode = {"items": n, "tokens": sum(lengths_all), "prefix_tokens": prefix_tokens}
        parts, index = [], []
        for chunk in self._chunks(lengths_all):
            seqs = [states[i].to(dev, dtype) for i in chunk]  # type: ignore[union-attr]
            h = nn.utils.rnn.pad_sequence(seqs, batch_first=True)
            lengths = torch.tensor([s.shape[0] for s in seqs], device=dev)
            mask = (torch.arange(h.shape[1], device=dev)[None, :] < lengths[:, None]).long()
            h = self._run(h, mask, self.frozen, self.n_layers)
            parts.append(self._pool(h, mask))
            index.extend(chunk)
        return _unpermute(torch.cat(parts), index)

    def forward(
        self,
        texts: Sequence[str],
        item_ids: Sequence[str] | None = None,
        text_hashes: Sequence[str] | None = None,
    ) -> Tensor:
        pooled = self.encode_pooled(texts, item_ids, text_hashes)
        return self.proj(pooled.to(self.proj.weight.dtype))

    @torch.no_grad()
    def center(self, pooled: Tensor) -> None:
        """Set the projection's bias so that the mean of ``pooled`` (``[n, hidden]``) maps to 0.

        ``proj(x - m) = W x - W m``: centring is a bias, so it is saved and
        learned like any other parameter.  Sentence encoders put most of a
        text vector's length on one direction shared by every text (mean
        pairwise cosine 0.64-0.75 on the project's catalogs); without this the
        towers start with every item alike.
        """
        if pooled.numel() == 0:
            return
        mean = pooled.to(self.proj.weight.dtype).mean(0)
        self.proj.bias.copy_(-(self.proj.weight @ mean))
        self.centred.fill_(True)


def _unpermute(x: Tensor, index: list[int]) -> Tensor:
    """Rows of ``x`` are items ``index[0], index[1], ...``; return them in item order."""
    inv = torch.empty(len(index), dtype=torch.long)
    inv[torch.tensor(index, dtype=torch.long)] = torch.arange(len(index))
    return x[inv.to(x.device)]


# --------------------------------------------------------------------------- user tower
class UserTower(nn.Module):
    """History item vectors (+ hashed user embedding) -> one user vector.

    ``attention``: a learned query (plus the user's hashed embedding) attends,
    with ``heads`` heads, over the history items (each plus a recency
    embedding) and an always-present "no history" slot; ``mean``: the average
    of the same slots.  A residual MLP follows.

    Keys and values are linear in the item vectors, so :meth:`forward_indexed`
    projects each *unique* item of a batch once and gathers, instead of
    projecting every (example, history slot): the same function, far cheaper
    when histories overlap.
    """

    def __init__(
        self,
        *,
        kind: Literal["attention", "mean"],
        dim: int,
        max_history: int,
        heads: int,
        user_buckets: int,
        dropout: float,
    ) -> None:
        super().__init__()
        if kind == "attention" and dim % heads:
            raise ModelError(f"embed_dim {dim} is not divisible by attention_heads {heads}")
        self.kind = kind
        self.dim = dim
        self.heads = heads
        self.max_history = max_history
        self.user_buckets = user_buckets
        # the always-present "no history" slot; zero at the start, so a user without history starts
        # with no taste direction (biases only) instead of a random one
        self.empty = nn.Parameter(torch.zeros(dim))
        self.recency = nn.Embedding(max(max_history, 1), dim)
        nn.init.zeros_(self.recency.weight)  # starts as plain pooling; recency is learned
        if kind == "attention":
            self.query = nn.Parameter(torch.randn(dim) * 0.02)
            self.q_proj = nn.Linear(dim, dim)
            self.k_proj = nn.Linear(dim, dim)
            self.v_proj = nn.Linear(dim, dim)
            self.out_proj = nn.Linear(dim, dim)
            self.attn_dropout = nn.Dropout(dropout)
        self.user_embedding = nn.Embedding(user_buckets, dim) if user_buckets else None
        if self.user_embedding is not None:
            nn.init.zeros_(self.user_embedding.weight)  # learned from the user's own labels
        self.mlp = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim)
        )
        # Zero-initialised residual: at the start the user vector *is* the pooled history, so the
        # click head's cosine starts as the text similarity of the candidate to what the user
        # clicked (AUC 0.66 on the synthetic stream before any update), and learning refines it.
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def _ranks(self, history_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Recency rank of each slot (0 = most recent) and the mask of the slots read."""
        mask = history_mask.bool()
        h = mask.shape[1]
        rank = mask.sum(1, keepdim=True) - 1 - torch.arange(h, device=mask.device)[None, :]
        if self.max_history and h > self.max_history:  # read only the most recent entries
            mask = mask & (rank < self.max_history)
        return rank.clamp(0, self.recency.num_embeddings - 1), mask

    def _user_embedding(self, user_ids: Sequence[str], device: torch.device) -> Tensor | None:
        if self.user_embedding is None:
            return None
        buckets = torch.tensor([user_bucket(u, self.user_buckets) for u in user_ids], device=device)
        return self.user_embedding(buckets)

    def forward(self, history_vecs: Tensor, history_mask: Tensor, user_ids: Sequence[str]) -> Tensor:
        """User vectors from per-slot history vectors ``[b, h, d]`` (valid first, most recent last)."""
        rank, mask = self._ranks(history_mask)
        x = history_vecs + self.recency(rank)
        if self.kind == "attention":
            return self._finish(*self._attend(self.k_proj(x), self.v_proj(x), mask, user_ids), mask)
        return self._finish(self._mean(x, mask), self._user_embedding(user_ids, x.device), mask)

    def forward_indexed(
        self, item_vecs: Tensor, history: Tensor, history_mask: Tensor, user_ids: Sequence[str]
    ) -> Tensor:
        """The same as :meth:`forward` on ``item_vecs[history]``, projecting each unique item once."""
        rank, mask = self._ranks(history_mask)
        if self.kind == "attention":
            k_rec = F.linear(self.recency.weight, self.k_proj.weight)  # W_k r (bias counted once)
            v_rec = F.linear(self.recency.weight, self.v_proj.weight)
            keys = self.k_proj(item_vecs)[history] + k_rec[rank]
            values = self.v_proj(item_vecs)[history] + v_rec[rank]
            return self._finish(*self._attend(keys, values, mask, user_ids), mask)
        x = item_vecs[history] + self.recency(rank)
        return self._finish(self._mean(x, mask), self._user_embedding(user_ids, x.device), mask)

    def _mean(self, x: Tensor, mask: Tensor) -> Tensor:
        m = mask.unsqueeze(-1).to(x.dtype)
        return (self.empty.to(x.dtype) + (x * m).sum(1)) / (1.0 + m.sum(1))

    def _attend(self, keys: Tensor, values: Tensor, mask: Tensor, user_ids: Sequence[str]) -> tuple[Tensor, Tensor | None]:
        b, h, d = keys.shape
        nh, dh = self.heads, d // self.heads
        ue = self._user_embedding(user_ids, keys.device)
        q = self.query.expand(b, d)
        if ue is not None:
            q = q + ue
        q = self.q_proj(q).view(b, nh, dh)
        k = keys.view(b, h, nh, dh)
        v = values.view(b, h, nh, dh)
        k0 = self.k_proj(self.empty).view(nh, dh)
        v0 = self.v_proj(self.empty).view(nh, dh)
        scale = 1.0 / math.sqrt(dh)
        s_hist = torch.einsum("bnd,bjnd->bnj", q, k) * scale
        s_hist = s_hist.masked_fill(~mask[:, None, :], float("-inf"))
        s_empty = (q * k0.to(q.dtype)).sum(-1, keepdim=True) * scale  # [b, nh, 1]
        w = self.attn_dropout(torch.softmax(torch.cat([s_empty, s_hist], dim=-1), dim=-1))
        out = w[..., :1] * v0.to(q.dtype) + torch.einsum("bnj,bjnd->bnd", w[..., 1:], v)
        return self.out_proj(out.reshape(b, d)), ue

    def _finish(self, pooled: Tensor, ue: Tensor | None, mask: Tensor) -> tuple[Tensor, Tensor | None]:
        """The user's taste direction and, separately, the user's own embedding.

        The direction is unit length, or zero for a user without history: the
        vector of such a user is (near) zero, and normalising it would send
        gradients of ``1/|x|`` (1e11 measured) into the global clipping norm,
        stopping every other parameter's step in that batch.
        """
        has = mask.any(1, keepdim=True)
        v = pooled + self.mlp(pooled)
        v = torch.where(has, v, torch.ones_like(v))  # the unused branch gets no gradient
        return F.normalize(v, dim=-1) * has.to(v.dtype), ue

    def embedding(self, user_ids: Sequence[str], device: torch.device) -> Tensor | None:
        """The hashed user embedding rows (None without ``user_buckets``)."""
        return self._user_embedding(user_ids, device)


# --------------------------------------------------------------------------- heads
class ClickHead(nn.Module):
    """logit = user . item + item bias + user bias + b, on augmented vectors.

    The last column of each vector is its bias; the rest of an item vector
    is unit length and a user vector is ``scale * taste + e_user`` (see
    :class:`RecModel`), so the logit is ``scale * cos(taste, item) +
    e_user . item + biases``: the text similarity of the candidate to the
    user's history, plus a per-user linear model over the item vectors.
    ``item_bias`` is the text part of the item's bias, applied by the model
    when it builds the item vector.  Pairwise or all pairs, the same formula.
    """

    def __init__(self, dim: int, init_ctr: float = 0.5) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.item_bias = nn.Linear(dim, 1)
        nn.init.zeros_(self.item_bias.weight)
        nn.init.zeros_(self.item_bias.bias)
        self.bias = nn.Parameter(torch.tensor(math.log(init_ctr / (1.0 - init_ctr))))

    def scale(self) -> Tensor:
        """The weight of the history's text similarity (the user vector's length before ``e_user``)."""
        return self.log_scale.clamp(max=math.log(100.0)).exp()

    def forward(self, user_vecs: Tensor, item_vecs: Tensor) -> Tensor:
        dot = (user_vecs[..., :-1] * item_vecs[..., :-1]).sum(-1)
        return dot + item_vecs[..., -1] + user_vecs[..., -1] + self.bias

    def matrix(self, user_vecs: Tensor, item_vecs: Tensor) -> Tensor:
        return user_vecs[:, :-1] @ item_vecs[:, :-1].T + item_vecs[:, -1][None, :] + user_vecs[:, -1][:, None] + self.bias


class CategoryHead(nn.Module):
    """Multi-label category logits from the item vector (text only)."""

    def __init__(self, dim: int, n_categories: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, n_categories))

    def forward(self, item_vecs: Tensor) -> Tensor:
        return self.net(item_vecs)


class ValueHead(nn.Module):
    """Expected value of a click (e.g. rating, dwell seconds) for a user-item pair."""

    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(3 * dim, dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim, 1)
        )

    def forward(self, user_vecs: Tensor, item_vecs: Tensor) -> Tensor:
        return self.net(torch.cat([user_vecs, item_vecs, user_vecs * item_vecs], dim=-1)).squeeze(-1)


# --------------------------------------------------------------------------- model
@dataclass
class ModelOutput:
    click_logits: Tensor  # [b]
    item_vecs: Tensor  # [u, d]
    user_vecs: Tensor  # [b, d] (each example's context)
    category_logits: Tensor | None  # [u, C]
    value_pred: Tensor | None  # [b]


class RecModel(nn.Module):
    """Item tower + user tower + heads; ``config`` rebuilds it with :func:`build_model`.

    Item and user vectors are *augmented*: ``[embed_dim]`` of direction plus
    one last column holding the item's (or user's) bias, so that the score
    of a pair is a function of the two vectors alone and serving can cache
    item vectors and score a whole catalog with one product:

    - item: ``t = proj(text)`` (+ ``E_item[hash(item_id)]``); bias column
      ``w . t/|t| + b_item[hash(item_id)]`` (the text part scores a new item
      that no one has clicked yet; the id part learns what a title cannot:
      popularity and collaborative taste);
    - user: the user tower over the history's item vectors (+ the hashed
      user embedding); bias column ``b_user[hash(user_id)]``.
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        item_tower: ItemTower,
        user_tower: UserTower,
        click_head: ClickHead,
        category_head: CategoryHead | None,
        value_head: ValueHead | None,
    ) -> None:
        super().__init__()
        self.config = config
        self.item_tower = item_tower
        self.user_tower = user_tower
        self.click_head = click_head
        self.category_head = category_head
        self.value_head = value_head
        dim = config.embed_dim
        self.item_embedding = nn.Embedding(config.item_buckets, dim) if config.item_buckets else None
        self.item_id_bias = nn.Embedding(config.item_buckets, 1) if config.item_buckets else None
        self.user_id_bias = nn.Embedding(config.user_buckets, 1) if config.user_buckets else None
        self.category_embedding = (
            nn.Embedding(len(config.categories), dim) if config.category_features and config.categories else None
        )
        self._category_index = {c: n for n, c in enumerate(config.categories)}
        if self.item_embedding is not None:
            nn.init.normal_(self.item_embedding.weight, std=ID_INIT_STD)
        if self.category_embedding is not None:
            nn.init.normal_(self.category_embedding.weight, std=CATEGORY_INIT_STD)
        for bias in (self.item_id_bias, self.user_id_bias):
            if bias is not None:
                nn.init.zeros_(bias.weight)
        self._buckets: dict[str, int] = {}

    @property
    def dim(self) -> int:
        return self.config.embed_dim

    @property
    def vector_width(self) -> int:
        """Width of the item and user vectors: ``embed_dim`` + the bias column."""
        return self.config.embed_dim + 1

    def _item_rows(self, item_ids: Sequence[str], device: torch.device) -> Tensor:
        n, cache = self.config.item_buckets, self._buckets
        rows = []
        for i in item_ids:
            r = cache.get(i)
            if r is None:
                if len(cache) >= _BUCKET_CACHE:
                    cache.clear()
                r = cache[i] = item_bucket(i, n)
            rows.append(r)
        return torch.tensor(rows, dtype=torch.long, device=device)

    def category_multi_hot(self, categories: Sequence[Sequence[str]], device: torch.device) -> Tensor:
        """``[n, C]`` multi-hot of each item's categories over ``config.categories`` (others ignored)."""
        out = torch.zeros((len(categories), len(self._category_index)), device=device)
        for r, cats in enumerate(categories):
            for c in cats:
                k = self._category_index.get(c)
                if k is not None:
                    out[r, k] = 1.0
        return out

    def _augment_items(
        self, text_vecs: Tensor, item_ids: Sequence[str] | None, category_hot: Tensor | None = None
    ) -> Tensor:
        """``[n, d]`` projected text vectors -> ``[n, d + 1]`` item vectors (ids and categories added)."""
        bias = self.click_head.item_bias(F.normalize(text_vecs, dim=-1))
        vecs = text_vecs
        if self.category_embedding is not None and category_hot is not None and category_hot.numel():
            hot = category_hot.to(vecs.dtype)
            vecs = vecs + (hot @ self.category_embedding.weight.to(vecs.dtype)) / hot.sum(1, keepdim=True).clamp_min(1.0)
        if self.item_embedding is not None and item_ids is not None and len(item_ids):
            rows = self._item_rows(item_ids, text_vecs.device)
            vecs = vecs + self.item_embedding(rows).to(vecs.dtype)
            bias = bias + self.item_id_bias(rows).to(bias.dtype)  # type: ignore[misc]
        return torch.cat([F.normalize(vecs, dim=-1), bias], dim=-1)

    def _augment_users(self, taste: tuple[Tensor, Tensor | None], user_ids: Sequence[str]) -> Tensor:
        """(unit taste direction, user embedding) -> ``[b, d + 1]``: ``scale * taste + e_user``, bias."""
        direction, ue = taste
        user_vecs = self.click_head.scale() * direction
        if ue is not None:
            user_vecs = user_vecs + ue.to(user_vecs.dtype)
        if self.user_id_bias is None:
            bias = user_vecs.new_zeros((user_vecs.shape[0], 1))
        else:
            rows = torch.tensor(
                [user_bucket(u, self.config.user_buckets) for u in user_ids], dtype=torch.long, device=user_vecs.device
            )
            bias = self.user_id_bias(rows).to(user_vecs.dtype)
        return torch.cat([user_vecs, bias], dim=-1)

    # --- the serving/learning API -------------------------------------------------
    def encode_items(
        self,
        texts: Sequence[str],
        item_ids: Sequence[str] | None = None,
        text_hashes: Sequence[str] | None = None,
        categories: Sequence[Sequence[str]] | None = None,
    ) -> Tensor:
        """Item vectors ``[n, embed_dim + 1]``; pass ``item_ids`` for the id part (and the prefix cache)
        and ``categories`` (each item's category names) for the category part.

        Without ``item_ids`` and ``categories`` an item is scored from its text alone.
        """
        text = self.item_tower(texts, item_ids, text_hashes)
        hot = self.category_multi_hot(categories, text.device) if categories is not None else None
        return self._augment_items(text, item_ids, hot)

    def encode_users(self, history_vecs: Tensor, history_mask: Tensor, user_ids: Sequence[str]) -> Tensor:
        """User vectors ``[b, embed_dim + 1]`` from history item vectors ``[b, h, embed_dim + 1]``
        (valid first, recent last)."""
        users = self.user_tower(history_vecs[..., : self.dim], history_mask, user_ids)
        return self._augment_users(users, user_ids)

    def encode_users_indexed(
        self, item_vecs: Tensor, history: Tensor, history_mask: Tensor, user_ids: Sequence[str]
    ) -> Tensor:
        """:meth:`encode_users` of ``item_vecs[history]`` (history: ``[b, h]`` indices), cheaper."""
        users = self.user_tower.forward_indexed(item_vecs[..., : self.dim], history, history_mask, user_ids)
        return self._augment_users(users, user_ids)

    def click_logits(self, user_vecs: Tensor, item_vecs: Tensor) -> Tensor:
        """Click logit of each (user, item) row pair: ``[b]``."""
        return self.click_head(user_vecs, item_vecs)

    def score_matrix(self, user_vecs: Tensor, item_vecs: Tensor) -> Tensor:
        """Click logits of every user against every item: ``[b, n]`` (same formula as click_logits)."""
        return self.click_head.matrix(user_vecs, item_vecs)

    def category_logits(self, item_vecs: Tensor) -> Tensor:
        """Category logits from item vectors (the text and id part, not the bias column)."""
        if self.category_head is None:
            raise ModelError("this model has no category head (config.categories is empty)")
        return self.category_head(item_vecs[..., : self.dim])

    def value(self, user_vecs: Tensor, item_vecs: Tensor) -> Tensor:
        if self.value_head is None:
            raise ModelError("this model has no value head (config.value_head is false)")
        return self.value_head(user_vecs[..., : self.dim], item_vecs[..., : self.dim])

    def forward(self, batch: Batch) -> ModelOutput:
        """All heads on one batch, encoding each unique item and each unique context once."""
        text = self.item_tower(batch.texts, batch.item_ids, batch.text_hashes)
        hot = batch.category_targets if self.category_embedding is not None else None
        items = self._augment_items(text, batch.item_ids, hot)
        cand = items[batch.candidate]
        contexts = self.encode_users_indexed(items, batch.history, batch.history_mask, batch.user_ids)
        users = contexts[batch.context]
        return ModelOutput(
            click_logits=self.click_logits(users, cand),
            item_vecs=items,
            user_vecs=users,
            # the category head reads the text part only: it is a task about the text
            category_logits=self.category_head(text) if self.category_head is not None else None,
            value_pred=self.value(users, cand) if self.value_head is not None else None,
        )

    @torch.no_grad()
    def center_text(self, texts: Sequence[str], item_ids: Sequence[str] | None = None,
                    text_hashes: Sequence[str] | None = None) -> None:
        """Centre the text vectors on these items' mean (see :meth:`ItemTower.center`)."""
        was = self.training
        self.eval()
        try:
            pooled = self.item_tower.encode_pooled(texts, item_ids, text_hashes)
        finally:
            self.train(was)
        self.item_tower.center(pooled)

    # --- parameters -----------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The parameters that learn (heads, towers, unfrozen layers, LoRA adapters): a delta snapshot."""
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by group: ``encoder`` (unfrozen layers / LoRA), ``towers``, ``heads``,
        ``ids`` (the per-id biases and user embeddings: added to the logit, learned like counters) and
        ``item_ids`` (the item-id and category embeddings, inside the item vector)."""
        groups: dict[str, list[nn.Parameter]] = {"encoder": [], "towers": [], "heads": [], "ids": [], "item_ids": []}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if name.startswith(("item_id_bias.", "user_id_bias.", "user_tower.user_embedding.")):
                groups["ids"].append(p)
            elif name.startswith(("item_embedding.", "category_embedding.")):
                groups["item_ids"].append(p)
            elif name.startswith("item_tower.encoder."):
                groups["encoder"].append(p)
            elif name.startswith(("item_tower.", "user_tower.")):
                groups["towers"].append(p)
            else:
                groups["heads"].append(p)
        return groups

    # --- the frozen-prefix cache --------------------------------------------------------
    @property
    def prefix_cache(self) -> PrefixCache | None:
        return self.item_tower.cache

    def attach_cache(self, cache: PrefixCache | None) -> None:
        """Use ``cache`` for the frozen prefix (no-op without one); a cache of another prefix is emptied."""
        if cache is not None and self.item_tower.frozen == 0:
            log.info("no frozen encoder layers: the prefix cache is not used")
            cache = None
        self.item_tower.attach_cache(cache, self.prefix_signature())

    def prefix_signature(self) -> str:
        c = self.config
        return f"{c.encoder or 'default'}|layers={c.encoder_layers}|frozen={self.item_tower.frozen}|len={c.max_text_len}|pool={c.pooling}"

    def frozen_prefix_parameters(self) -> list[Tensor]:
        return [p for m in self.item_tower.frozen_modules() for p in m.parameters()]


# --------------------------------------------------------------------------- building
def _load_encoder(name: str, config: ModelConfig) -> tuple[nn.Module, object]:
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    # Keeping the first N layers and dropping the pooler leaves "unexpected" weights by design:
    # keep transformers' load report and progress bar out of the logs.
    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        overrides: dict[str, object] = {}
        if config.encoder_layers is not None:
            overrides["num_hidden_layers"] = config.encoder_layers
        enc_config = AutoConfig.from_pretrained(name, **overrides)
        for attr in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if hasattr(enc_config, attr):
                setattr(enc_config, attr, config.dropout)
        try:
            encoder = AutoModel.from_pretrained(name, config=enc_config, add_pooling_layer=False)
        except TypeError:
            encoder = AutoModel.from_pretrained(name, config=enc_config)
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load encoder {name!r}: {exc}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
    if config.encoder_layers is not None and config.encoder_layers > enc_config.num_hidden_layers:
        raise ModelError(f"encoder {name!r} has fewer than {config.encoder_layers} layers")
    return encoder, tokenizer


def build_model(config: ModelConfig) -> RecModel:
    """Build the model described by ``config`` (pretrained encoder weights + seeded new parts)."""
    name = resolve_encoder(config.encoder)
    if config.encoder is not None and Path(name).exists():
        name = str(Path(name))
    encoder, tokenizer = _load_encoder(name, config)
    n_layers = len(encoder.encoder.layer) if hasattr(encoder, "encoder") else 0

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        if config.lora_rank > 0:
            frozen = frozen_layer_count(config.freeze_layers, n_layers)
            if frozen >= n_layers:
                raise ModelError(
                    f"lora_rank > 0 needs unfrozen layers: freeze_layers={config.freeze_layers} "
                    f"freezes all {n_layers} encoder layers; set freeze_layers=-1 to adapt the top one"
                )
            from peft import LoraConfig, inject_adapter_in_model

            lora = LoraConfig(
                r=config.lora_rank,
                lora_alpha=config.lora_alpha,
                lora_dropout=config.lora_dropout,
                target_modules=list(config.lora_targets),
                layers_to_transform=list(range(frozen, n_layers)),
                layers_pattern="layer",
            )
            encoder = inject_adapter_in_model(lora, encoder)
        for name_, p in encoder.named_parameters():
            if config.lora_rank > 0:
                p.requires_grad_("lora_" in name_)
            else:
                p.requires_grad_(True)
        item_tower = ItemTower(
            encoder,
            tokenizer,
            embed_dim=config.embed_dim,
            max_text_len=config.max_text_len,
            pooling=config.pooling,
            freeze_layers=config.freeze_layers,
            encode_chunk=config.encode_chunk,
        )
        for m in item_tower.frozen_modules():
            m.requires_grad_(False)
        dim = config.embed_dim
        model = RecModel(
            config,
            item_tower=item_tower,
            user_tower=UserTower(
                kind=config.user_tower,
                dim=dim,
                max_history=config.max_history,
                heads=config.attention_heads,
                user_buckets=config.user_buckets,
                dropout=config.dropout,
            ),
            click_head=ClickHead(dim, config.init_ctr),
            category_head=CategoryHead(dim, len(config.categories), config.dropout)
            if config.categories
            else None,
            value_head=ValueHead(dim, config.dropout) if config.value_head else None,
        )
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    log.info(
        "built model: encoder %s (%d layers, %d frozen, lora rank %d), %d/%d parameters trainable",
        config.encoder or "default",
        n_layers,
        item_tower.frozen,
        config.lora_rank,
        n_train,
        n_all,
    )
    return model.eval()  # as from_pretrained: inference mode until a learner trains it


# --------------------------------------------------------------------------- training wrapper
@dataclass
class TrainOutput:
    loss: Tensor
    losses: dict[str, float]
    output: ModelOutput


class RecTrain(nn.Module):
    """Owns the losses: weighted click BCE, category BCE, value Huber, and distillation.

    Distillation pulls the click probabilities towards a teacher's (the last
    published model) at temperature ``T``: BCE(sigmoid(s/T), sigmoid(t/T)) * T^2.
    """

    def __init__(self, model: RecModel, *, distill_weight: float = 0.0, distill_temperature: float = 1.0) -> None:
        super().__init__()
        self.model = model
        self.distill_weight = distill_weight
        self.distill_temperature = distill_temperature

    def forward(self, batch: Batch, teacher_logits: Tensor | None = None) -> TrainOutput:
        out = self.model(batch)
        return TrainOutput(*self.losses(batch, out, teacher_logits), output=out)

    def losses(
        self, batch: Batch, out: ModelOutput, teacher_logits: Tensor | None = None
    ) -> tuple[Tensor, dict[str, float]]:
        tw = self.model.config.task_weights
        logits = out.click_logits.float()
        w = batch.weights.to(logits.dtype)
        click = (F.binary_cross_entropy_with_logits(logits, batch.labels, reduction="none") * w).sum() / w.sum().clamp_min(1e-12)
        total = tw.click * click
        parts = {"click": float(click.detach())}
        if out.category_logits is not None and bool(batch.category_mask.any()):
            m = batch.category_mask
            cat = F.binary_cross_entropy_with_logits(out.category_logits.float()[m], batch.category_targets[m])
            total = total + tw.category * cat
            parts["category"] = float(cat.detach())
        if out.value_pred is not None and bool(batch.value_mask.any()):
            m = batch.value_mask
            val = F.smooth_l1_loss(out.value_pred.float()[m], batch.values[m])
            total = total + tw.value * val
            parts["value"] = float(val.detach())
        if teacher_logits is not None and self.distill_weight > 0:
            t = self.distill_temperature
            target = torch.sigmoid(teacher_logits.float().detach() / t)
            distill = F.binary_cross_entropy_with_logits(logits / t, target) * (t * t)
            total = total + self.distill_weight * distill
            parts["distill"] = float(distill.detach())
        parts["loss"] = float(total.detach())
        return total, parts
