"""The settings of the continual learner: optimisation, replay, distillation, metrics (all JSON-able)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class LearnerConfig(BaseModel):
    """Optimisation and forgetting settings of the continual learner."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lr_encoder: float = Field(default=3e-5, ge=0.0, description="AdamW lr of unfrozen encoder layers / LoRA.")
    lr_towers: float = Field(
        default=1e-4,
        ge=0.0,
        description="AdamW lr of the projection and the user tower.  Small: the frozen text geometry is "
        "the prior that carries a young stream (faster rates lost 0.02-0.09 AUC on the evaluation streams).",
    )
    lr_projection: float = Field(
        default=1e-5,
        ge=0.0,
        description="AdamW lr of the text projection.  Very small: it starts on the catalog's principal "
        "text directions (ModelConfig.text_basis), a basis the per-user rows learn in; moving it fast "
        "re-mixes that basis under them (1e-4: synthetic stream -0.011 AUC; MovieLens 20k +0.002).",
    )
    lr_heads: float = Field(
        default=1e-2, ge=0.0, description="AdamW lr of the click/category/value heads (a few scalars and vectors)."
    )
    lr_scale: float = Field(
        default=0.3,
        ge=0.0,
        description="AdamW lr of the log of the history cosine's weight in the click logit "
        "(ModelConfig.history_scale is where it starts).  Fast enough for the weight to find its level "
        "within a few batches: in the closed loop it falls from 5 to ~0.1 (the history of one's own "
        "recommendations' clicks ranks poorly) while MovieLens keeps it at 2-4; 1e-2 -> 0.3 (with the hazard "
        "0.1): closed loop without Kafka 0.649 -> 0.759 of optimal over the last 250 requests before the shift "
        "and 0.644 -> 0.793 at the end (3 seeds), synthetic and MovieLens AUC unchanged.",
    )
    lr_ids: float = Field(
        default=0.1,
        ge=0.0,
        description="Adagrad lr of the item-id biases when item_bias_prior_stds is empty, and of the user "
        "rows when lr_user_ids is None (no weight decay).  Adagrad, not "
        "Adam: a row's steps shrink with the evidence it has seen, like a click counter's average, "
        "where Adam would move a rarely seen row by a full lr on each noisy label.  0.2 -> 0.1: "
        "MovieLens-20k +0.002 AUC (0.05-0.3: 0.869, 0.870, 0.870, 0.869, 0.866), synthetic the same "
        "(mean of 4 seeds 0.665 at 0.05-0.2) with log loss 0.290 -> 0.277.",
    )
    lr_user_ids: float | None = Field(
        default=0.02,
        ge=0.0,
        description="Adagrad lr of the per-user rows (user embeddings and biases); None = lr_ids.  Since "
        "the per-user posterior learns each user's taste in closed form, the gradient-trained user rows "
        "mostly add noise: 0.1 (= lr_ids) -> 0.02 gave synthetic 0.675 -> 0.680 AUC (4 seeds), "
        "MovieLens 20k / 100k 0.871 / 0.897 -> 0.871 / 0.896, and the closed loop without Kafka "
        "0.793 -> 0.833 of optimal over the last 250 requests (3 seeds); see README, the per-id rates.",
    )
    lr_position: float = Field(
        default=0.5,
        ge=0.0,
        description="Adagrad lr of the train-time position term (ModelConfig.position_slots): a few rows "
        "that every example trains, so a fast rate (the per-id rows' 0.1 left half of a position effect "
        "in the items' biases in the unit test).",
    )
    id_optimizer: Literal["adagrad", "row_adagrad"] = Field(
        default="row_adagrad",
        description="Optimizer of the per-id rows: row-wise Adagrad (one accumulator per row, see "
        "trainer/optim.py) or torch's Adagrad (one per coordinate, which whitens a user row's step).",
    )
    id_decay: float = Field(
        default=1.0, gt=0.0, le=1.0,
        description="row_adagrad only: a touched row's accumulator is multiplied by this first (1 = never forget).",
    )
    posterior_prior_std: float = Field(
        default=0.5,
        gt=0.0,
        le=100.0,
        description="Prior standard deviation of each weight of the per-user posterior "
        "(ModelConfig.user_posterior_dims; trainer/posterior.py), where empirical Bayes starts from: "
        "its refits move slowly from the start while the users' posteriors are mostly prior, so the start "
        "matters (synthetic, seeds 0-3, refit every batch: 0.2 0.687, 0.3 0.690, 0.5 0.689 mean AUC; "
        "1.0 with a refit every 10 batches 0.685, 3.0 0.664 on seeds 0-1; MovieLens-20k 0.877 at 0.3 and "
        "0.5, 0.876 at 1.0; the closed loop's last 250 requests before/after the shift 0.786/0.886 at 0.5, "
        "0.807/0.863 at 0.3, 0.754/0.849 at 1.0).",
    )
    posterior_forgetting: float = Field(
        default=0.97,
        gt=0.0,
        le=1.0,
        description="Per shown example of a user, the user's posterior precision decays towards the prior's "
        "by this factor (1 = never forget): the weight of a label 100 examples back is 0.97^100 = 5%.",
    )
    posterior_refit_every: int = Field(
        default=1,
        ge=0,
        description="Every N posterior updates (batches), empirical Bayes refits the prior variance of each "
        "posterior weight from the users' posteriors (trainer/posterior.py); 0 = keep posterior_prior_std.",
    )
    posterior_full_prior: bool = Field(
        default=False,
        description="Empirical Bayes refits the per-user posterior's whole prior covariance (the weights' "
        "correlations across users) instead of its diagonal (trainer/posterior.py).  Off: on the synthetic "
        "stream, whose text directions and categories go together, it scored the same (seeds 0-3 mean 0.690 "
        "full, 0.690 diagonal, prior std 0.3).",
    )
    posterior_change_hazard: float = Field(
        default=0.1,
        ge=0.0,
        lt=1.0,
        description="Prior probability that a user's taste changed since the posterior last learned from them "
        "(per update the user takes part in, whatever their number of examples in it): the posterior restarts "
        "towards the prior by the probability of a change given the batch's labels (trainer/posterior.py); "
        "0 = off (forgetting alone follows drift).  With lr_scale 0.3 the history cosine no longer follows "
        "the shift for the posterior (its weight falls to ~0.05 on the synthetic stream), and 0.1 recovered "
        "from the synthetic interest shift in 10 / 14 batches (lift, seeds 1 / 2) where 0.02 took 21 / never, "
        "at the same AUC on synthetic and MovieLens.",
    )
    lr_posterior_weight: float = Field(
        default=1e-2,
        ge=0.0,
        description="AdamW lr of the weight of the per-user posterior's term in the click logit "
        "(RecModel.posterior_weight, from 1).",
    )
    posterior_newton_steps: int = Field(default=2, ge=1, le=10, description="Newton iterations per batch and user.")
    item_bias_prior_stds: tuple[Annotated[float, Field(gt=0.0, le=100.0)], ...] = Field(
        default=(0.03, 0.1, 0.3, 1.0, 3.0),
        description="The item-id biases are a per-item Bayesian posterior, one per prior std of this "
        "grid; the prior whose predictions of each batch, before it learned from it, were the most likely "
        "so far is the one the model uses (trainer/posterior.py ItemBiasPosterior).  Empty = the biases "
        "learn by Adagrad at lr_ids.  The stream picks: std 1 on MovieLens, 0.1-0.3 on the synthetic "
        "stream, where Adagrad's one rate fitted either (MovieLens-20k 0.871 -> 0.876, synthetic "
        "0.687 -> 0.692).",
    )
    item_bias_forgetting: float = Field(
        default=1.0,
        gt=0.0,
        le=1.0,
        description="Per shown example of an item, its bias posterior's precision decays towards the prior's "
        "by this factor (1 = never forget, like a click counter).",
    )
    lr_item_ids: float = Field(
        default=1e-3, ge=0.0, description="AdamW lr of the item-id and category embeddings (no weight decay)."
    )
    warmup_examples: int = Field(
        default=0,
        ge=0,
        description="The towers' and encoder's rates (and the item/category embeddings') ramp up linearly "
        "over the first N examples trained; the heads and the per-id rows learn at full rate from the "
        "start.  A young stream has the evidence to place ids and calibrate, not yet to move the shared "
        "text geometry (50,000: synthetic stream +0.013 AUC, MovieLens 20k -0.010).  0 = no warm-up.",
    )
    updates_per_batch: int = Field(
        default=2,
        ge=1,
        le=64,
        description="Optimizer steps on each batch (after it is scored): a stream is seen once, so one "
        "step per batch starves the model of updates.",
    )
    weight_decay: float = Field(default=0.01, ge=0.0, description="On matrices only (not biases, norms).")
    grad_clip: float = Field(default=1.0, ge=0.0, description="Max global grad norm; 0 = off.")
    replay_size: int = Field(default=20_000, ge=0, description="Reservoir capacity; 0 = no replay.")
    replay_ratio: float = Field(default=0.5, ge=0.0, description="Replayed examples per fresh one in an update.")
    replay_ids: bool = Field(
        default=False,
        description="Replayed examples also train the per-user rows (user embeddings, user biases; the "
        "item-id rows always learn from them).  Off: replay guards the shared parameters against forgetting, while a "
        "user's rows learn from each label once and follow the user's recent labels (replaying old "
        "labels into them held the synthetic stream's users to their interests before the shift).",
    )
    distill_weight: float = Field(default=0.5, ge=0.0, description="Weight of distillation; 0 = off.")
    distill_temperature: float = Field(default=2.0, gt=0.0)
    negative_sampling_rate: float = Field(
        default=1.0, gt=0.0, le=1.0, description="Share of negatives kept for the update (1 = all)."
    )
    window: int = Field(default=10_000, ge=1, description="Sliding window of the prequential metrics.")
    threshold: float = Field(default=0.5, gt=0.0, lt=1.0, description="Click threshold of precision/recall.")
    dedup_window: int = Field(default=100_000, ge=0, description="Recent example ids remembered; 0 = off.")
    prefix_cache_size: int = Field(default=100_000, ge=0, description="Items in the prefix cache; 0 = off.")
    teacher_cache_size: int = Field(default=100_000, ge=0, description="Cached teacher item vectors.")
    eval_batch_size: int = Field(default=1024, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    bf16: bool = Field(default=True, description="bf16 autocast on CUDA.")
    seed: int = 0
