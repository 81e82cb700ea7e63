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

:class:`~trainer.losses.RecTrain` (trainer/losses.py) is the training
wrapper: it takes a typed :class:`~trainer.batching.Batch` and owns the
losses and their task weights; the heads are in trainer/heads.py.

Everything needed to rebuild a model is in :class:`ModelConfig` (JSON), and
:func:`build_model` is deterministic: the same config gives the same
parameters (the heads are seeded), so a snapshot of the tensors that
training changed (the trainable parameters and the ``centred`` flag) is
enough to restore a model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.batching import Batch
from trainer.heads import CategoryHead, ClickHead, ValueHead
from trainer.model_config import (
    ModelConfig,
    ModelError,
    TaskWeights,
    frozen_layer_count,
    id_bucket,
    item_bucket,
    resolve_encoder,
    user_bucket,
)
from trainer.prefix_cache import PrefixCache
from trainer.towers import ItemTower, UserTower

__all__ = [  # the config and the parts, importable from here with the model
    "CategoryHead", "ClickHead", "ItemTower", "ModelConfig", "ModelError", "ModelOutput", "PrefixCache",
    "RecModel", "TaskWeights", "UserTower", "ValueHead", "build_model",
    "frozen_layer_count", "id_bucket", "item_bucket", "resolve_encoder", "user_bucket",
]

log = logging.getLogger(__name__)

ID_INIT_STD = 0.01
"""Initial scale of the id embeddings: small beside the text vectors, so text leads until ids learn."""
CATEGORY_INIT_STD = 0.05
"""Initial scale of the category embeddings: items of one category start a little alike."""


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
        self.position_bias = nn.Embedding(config.position_slots, 1) if config.position_slots else None
        """A logit per slate position (ModelConfig.position_slots), fitted in training; a score holds
        row 0's only (the top of the slate).  A row per position, learned like the per-id rows
        (Adagrad, LearnerConfig.lr_position)."""
        if self.position_bias is not None:
            nn.init.zeros_(self.position_bias.weight)
        if self.item_embedding is not None:
            nn.init.normal_(self.item_embedding.weight, std=ID_INIT_STD)
        if self.category_embedding is not None:
            nn.init.normal_(self.category_embedding.weight, std=CATEGORY_INIT_STD)
        for bias in (self.item_id_bias, self.user_id_bias):
            if bias is not None:
                nn.init.zeros_(bias.weight)
        # the per-user posterior (trainer/posterior.py): each user's weights on ``posterior_width``
        # item features, fitted in closed form by the learner (never by a gradient), and the
        # feature map's text part (the catalog's principal directions, set when the text is centred)
        k, p, hidden = config.posterior_width, config.user_posterior_dims, item_tower.hidden
        self.register_buffer("user_posterior_mean", torch.zeros(config.user_buckets, k) if k else None)
        self.register_buffer("posterior_basis", torch.zeros(p, hidden) if k and p else None)
        self.register_buffer("posterior_center", torch.zeros(hidden) if k and p else None)
        self.posterior_weight = nn.Parameter(torch.tensor(1.0)) if k else None
        """How much of the posterior's term the click logit takes, learned by gradient: the loss of a
        batch is taken before the posterior has seen it, so this weight learns how well the
        posterior predicts labels it has not fitted (a stream where the per-user fit is noise drives it
        towards 0)."""
        self._closed_form: set[str] = set()
        """Parameters the learner fits in closed form (no gradient), published like trainable ones."""

    @property
    def dim(self) -> int:
        return self.config.embed_dim

    def position_logits(self, position: Tensor) -> Tensor | None:
        """The train-time position term of each example's click logit (None when off): its row minus
        row 0's.  Row 0 is in every score (:meth:`_top_logit`), so a score is the click logit at the
        top of the slate, calibrated there, and the fast-learning rows carry the click level quickly
        (with row 0 fixed at 0, the slow global bias left that level to the item biases, which then
        took up part of the position effect again)."""
        if self.position_bias is None:
            return None
        slot = position.clamp(0, self.position_bias.num_embeddings - 1)
        w = self.position_bias.weight[:, 0]
        return w[slot] - w[0]

    def _top_logit(self) -> Tensor | float:
        """The position term of the top of the slate, part of every score (0 when off)."""
        return 0.0 if self.position_bias is None else self.position_bias.weight[0, 0]

    @property
    def vector_width(self) -> int:
        """Width of the item and user vectors: ``embed_dim`` + the posterior's features + the bias column."""
        return self.config.embed_dim + self.config.posterior_width + 1

    @property
    def posterior_width(self) -> int:
        return self.config.posterior_width

    def posterior_features(self, item_vecs: Tensor) -> Tensor:
        """The per-user posterior's features of item vectors: ``[n, posterior_width]``."""
        return item_vecs[..., self.dim : self.dim + self.posterior_width]

    def user_rows(self, user_ids: Sequence[str], device: torch.device) -> Tensor:
        """The hashed user-row index of each user id."""
        n = self.config.user_buckets
        return torch.tensor([user_bucket(u, n) for u in user_ids], dtype=torch.long, device=device)

    def _posterior_item_part(self, pooled: Tensor | None, category_hot: Tensor | None, like: Tensor) -> Tensor | None:
        """``[n, posterior_width]``: the centred text's principal coordinates and the category shares."""
        if not self.posterior_width:
            return None
        n, parts = like.shape[0], []
        if self.posterior_basis is not None:
            if pooled is None:
                parts.append(like.new_zeros((n, self.posterior_basis.shape[0])))
            else:
                x = pooled.to(self.posterior_basis.dtype) - self.posterior_center
                parts.append((x @ self.posterior_basis.T).to(like.dtype))
        c = self.posterior_width - (0 if self.posterior_basis is None else self.posterior_basis.shape[0])
        if c:
            if category_hot is None or not category_hot.numel():
                parts.append(like.new_zeros((n, c)))
            else:
                hot = category_hot.to(like.dtype)
                parts.append(hot / hot.sum(1, keepdim=True).clamp_min(1.0))
        return torch.cat(parts, dim=-1)

    def item_rows(self, item_ids: Sequence[str], device: torch.device) -> Tensor:
        """The hashed item-id row index of each item id."""
        n = self.config.item_buckets
        return torch.tensor([item_bucket(i, n) for i in item_ids], dtype=torch.long, device=device)

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
        self,
        text_vecs: Tensor,
        item_ids: Sequence[str] | None,
        category_hot: Tensor | None = None,
        pooled: Tensor | None = None,
    ) -> Tensor:
        """``[n, d]`` projected text vectors -> ``[n, d + k + 1]`` item vectors (ids and categories added;
        the posterior's ``k`` features of ``pooled``, the encoder's output, and the categories)."""
        bias = self.click_head.item_bias(F.normalize(text_vecs, dim=-1))
        vecs = text_vecs
        if self.category_embedding is not None and category_hot is not None and category_hot.numel():
            hot = category_hot.to(vecs.dtype)
            vecs = vecs + (hot @ self.category_embedding.weight.to(vecs.dtype)) / hot.sum(1, keepdim=True).clamp_min(1.0)
        if self.item_embedding is not None and item_ids is not None and len(item_ids):
            rows = self.item_rows(item_ids, text_vecs.device)
            vecs = vecs + self.item_embedding(rows).to(vecs.dtype)
            bias = bias + self.item_id_bias(rows).to(bias.dtype)  # type: ignore[misc]
        post = self._posterior_item_part(pooled, category_hot, text_vecs)
        parts = [F.normalize(vecs, dim=-1)] + ([post] if post is not None else []) + [bias]
        return torch.cat(parts, dim=-1)

    def _augment_users(self, taste: tuple[Tensor, Tensor | None], user_ids: Sequence[str]) -> Tensor:
        """(unit taste direction, user embedding) -> ``[b, d + k + 1]``: ``scale * taste + e_user``, the
        posterior's mean weights (fixed here: the learner fits them in closed form), bias."""
        direction, ue = taste
        user_vecs = self.click_head.scale() * direction
        if ue is not None:
            user_vecs = user_vecs + ue.to(user_vecs.dtype)
        rows = self.user_rows(user_ids, user_vecs.device) if self.config.user_buckets else None
        if self.user_id_bias is None or rows is None:
            bias = user_vecs.new_zeros((user_vecs.shape[0], 1))
        else:
            bias = self.user_id_bias(rows).to(user_vecs.dtype)
        if self.user_posterior_mean is None or rows is None:
            return torch.cat([user_vecs, bias], dim=-1)
        post = self.user_posterior_mean[rows].detach().to(user_vecs.dtype)
        weight = self.posterior_weight.clamp(0.0, 2.0)  # type: ignore[union-attr]
        return torch.cat([user_vecs, weight.to(post.dtype) * post, bias], dim=-1)

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
        pooled = self.item_tower.encode_pooled(texts, item_ids, text_hashes)
        text = self.item_tower.project(pooled)
        hot = self.category_multi_hot(categories, text.device) if categories is not None else None
        return self._augment_items(text, item_ids, hot, pooled)

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
        return self.click_head(user_vecs, item_vecs) + self._top_logit()

    def score_matrix(self, user_vecs: Tensor, item_vecs: Tensor) -> Tensor:
        """Click logits of every user against every item: ``[b, n]`` (same formula as click_logits)."""
        return self.click_head.matrix(user_vecs, item_vecs) + self._top_logit()

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
        pooled = self.item_tower.encode_pooled(batch.texts, batch.item_ids, batch.text_hashes)
        text = self.item_tower.project(pooled)
        hot = batch.category_targets if self.category_embedding is not None or self.posterior_width else None
        items = self._augment_items(text, batch.item_ids, hot, pooled)
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
        self.item_tower.center(pooled, principal=self.config.text_basis == "principal")
        if self.posterior_basis is not None and pooled.shape[0] >= 2:
            center, basis = posterior_text_basis(pooled.float(), self.posterior_basis.shape[0])
            self.posterior_center.copy_(center)
            self.posterior_basis.copy_(basis)

    # --- parameters -----------------------------------------------------------------
    def user_row_parameters(self) -> list[nn.Parameter]:
        """The per-user rows: the user embedding and the user bias."""
        mods = (self.user_tower.user_embedding, self.user_id_bias)
        return [m.weight for m in mods if m is not None and m.weight.requires_grad]

    def fit_item_bias_in_closed_form(self) -> None:
        """The item-id biases are learned by the learner's per-item posterior
        (:class:`trainer.posterior.ItemBiasPosterior`), not by gradient: no optimizer holds them, and
        :meth:`trainable_state_dict` still publishes them."""
        if self.item_id_bias is not None:
            self.item_id_bias.weight.requires_grad_(False)
            self._closed_form.add("item_id_bias.weight")

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """The parameters that learn (heads, towers, unfrozen layers, LoRA adapters), those fitted in
        closed form (the item-id biases of :meth:`fit_item_bias_in_closed_form`) and the per-user
        posterior's mean weights: a delta snapshot."""
        out = {n: p.detach() for n, p in self.named_parameters() if p.requires_grad or n in self._closed_form}
        if self.user_posterior_mean is not None:
            out["user_posterior_mean"] = self.user_posterior_mean
        return out

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by group: ``encoder`` (unfrozen layers / LoRA), ``projection`` (the text
        projection), ``towers`` (the rest of the towers: the user tower), ``heads``, ``scale`` (the
        weight of the history cosine in the click logit),
        ``ids`` (the item-id biases) and ``user_ids`` (the user embeddings and biases): added to the
        logit, learned like counters,
        ``position`` (the train-time position term, also learned like a counter) and
        ``item_ids`` (the item-id and category embeddings, inside the item vector)."""
        groups: dict[str, list[nn.Parameter]] = {
            "encoder": [], "projection": [], "towers": [], "heads": [], "scale": [], "ids": [], "user_ids": [],
            "position": [], "item_ids": [], "posterior": [],
        }
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            if name.startswith("position_bias."):
                groups["position"].append(p)
            elif name.startswith(("user_id_bias.", "user_tower.user_embedding.")):
                groups["user_ids"].append(p)
            elif name.startswith("item_id_bias."):
                groups["ids"].append(p)
            elif name.startswith(("item_embedding.", "category_embedding.")):
                groups["item_ids"].append(p)
            elif name.startswith("item_tower.encoder."):
                groups["encoder"].append(p)
            elif name.startswith("item_tower.proj."):
                groups["projection"].append(p)
            elif name.startswith(("item_tower.", "user_tower.")):
                groups["towers"].append(p)
            elif name == "click_head.log_scale":
                groups["scale"].append(p)
            elif name == "posterior_weight":
                groups["posterior"].append(p)
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


def posterior_text_basis(pooled: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(mean, ``[k, hidden]`` basis) of the per-user posterior's text features: the top ``k`` principal
    directions of the catalog's text vectors, each scaled so that the catalog's coordinates along
    the first have unit variance (the others keep their smaller spread).  A unit prior on every
    weight then leaves room where the texts differ most and little in their noise directions:
    in a per-user Bayesian logistic regression on the synthetic stream (4 seeds) this scaling
    scored 0.681 AUC against 0.677 for whitened coordinates (16 directions: 0.675, 0.649)."""
    mean = pooled.mean(0)
    _, s, vt = torch.linalg.svd(pooled - mean, full_matrices=False)
    basis = torch.zeros((k, pooled.shape[1]), dtype=pooled.dtype)
    m = min(k, vt.shape[0])
    basis[:m] = vt[:m] * (math.sqrt(pooled.shape[0]) / s[0].clamp_min(1e-12))
    return mean, basis


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
            click_head=ClickHead(dim, init_ctr=config.init_ctr, init_scale=config.history_scale),
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
