"""The per-user posterior: each user's weights on a few item features, fitted by Bayes' rule.

A user's clicks are few and arrive one at a time; a gradient step with a
learning rate either moves a user row too little (the row has seen little) or
too far (one noisy label).  The model therefore carries, beside the hashed
user embedding that gradients train, a per-user random effect in the manner
of GLMix (Zhang et al., KDD 2016): ``w_u . z_i`` added to the click logit,
where ``z_i`` is a low-dimensional item feature (the top principal
directions of the catalog's centred text vectors and the item's category
shares: :meth:`trainer.model.RecModel.posterior_features`) and ``w_u`` is the
mean of a Gaussian posterior, a Bayesian logistic regression on the user's
own labels with the rest of the model's logit as a fixed offset.

Each batch, for every user in it (:meth:`UserPosterior.update`):

* forgetting: the precision decays towards the prior's,
  ``L <- f L + (1 - f) L0`` with ``f = forgetting ** n`` for the user's ``n``
  shown examples in the batch, so that old labels lose weight and a user whose
  taste changes is followed (the mean is kept: a random walk);
* a change point (``change_hazard`` > 0): the probability ``r`` that the
  user's taste changed before this batch, from how well the posterior and the
  prior each predicted the batch's labels; the posterior moves towards the
  prior by ``r``, so a user who switches interests starts over within a batch
  or two instead of unlearning the old taste label by label.  The prior odds
  are ``change_hazard`` per update of the user, not per example: the step
  can only restart the user before the batch, and a change there is one
  gap in the user's sequence whatever the batch holds of them (with a
  per-example hazard, a user with 64 examples in a batch had prior odds of
  0.47 and restarted every batch);
* a Laplace step: ``newton_steps`` Newton iterations on
  ``1/2 (w - w_old)' L (w - w_old) - sum_j log p(y_j | offset_j + w . z_j)``;
  the new precision is ``L + sum_j p_j (1 - p_j) z_j z_j'``.

A late positive (``Labeled.late``: a click that turned an already learned
negative into a positive) adds the log-likelihood ratio of the two labels,
whose gradient is ``z`` and whose curvature is 0: the label is corrected, not
counted twice.

The means live in the model (``RecModel.user_posterior_mean``, published with
it, read by serving as part of the user vector); the precisions are the
learner's state (checkpointed, never published): only the rows of users seen.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

if TYPE_CHECKING:
    from trainer.batching import Batch
    from trainer.model import ModelOutput, RecModel


class PosteriorExamples(NamedTuple):
    """What the per-user posterior learns from, one row per example (CPU or device tensors)."""

    rows: Tensor
    """[n] long: the user's hashed row."""
    features: Tensor
    """[n, k]: the item's posterior features."""
    offsets: Tensor
    """[n]: the rest of the model's click logit (everything but the posterior's term)."""
    labels: Tensor
    """[n] 0/1."""
    late: Tensor
    """[n] bool: a late positive (the example was already learned as a negative)."""
    weights: Tensor
    """[n]: the example's loss weight."""
    item_rows: Tensor
    """[n] long: the shown item's hashed id row (the per-item bias posterior's row)."""
    item_offsets: Tensor
    """[n]: the click logit without the item-id bias (:class:`ItemBiasPosterior`'s offset), with the
    per-user posterior's term as it was before this step's update of it (the learner adds that
    update's change before the item step)."""

    @classmethod
    def empty(cls, k: int) -> PosteriorExamples:
        z = torch.zeros(0)
        rows = torch.zeros(0, dtype=torch.long)
        return cls(rows, torch.zeros((0, k)), z, z, torch.zeros(0, dtype=torch.bool), z, rows, z)

    def cpu(self) -> PosteriorExamples:
        return PosteriorExamples(*(t.detach().cpu() for t in self))

    @classmethod
    def concat(cls, parts: Sequence[PosteriorExamples]) -> PosteriorExamples:
        return cls(*(torch.cat([p[f] for p in parts]) for f in range(len(cls._fields))))


@torch.no_grad()
def posterior_examples(
    model: RecModel, batch: Batch, output: ModelOutput, keep: Sequence[int], late: Sequence[bool]
) -> PosteriorExamples:
    """The posterior's examples of rows ``keep`` of a trained batch, from the training forward's
    ``output`` (its logits hold the posterior's current term, taken out again as the offset)."""
    dev = output.click_logits.device
    idx = torch.tensor(list(keep), dtype=torch.long, device=dev)
    z = model.posterior_features(output.item_vecs)[batch.candidate[idx]].float()
    own = model.posterior_features(output.user_vecs)[idx].float()
    logits = output.click_logits[idx].float()
    if batch.position is not None:
        pos = model.position_logits(batch.position[idx].to(dev))
        if pos is not None:
            logits = logits + pos.float()
    contexts = batch.context[idx].tolist()
    rows = model.user_rows([batch.user_ids[c] for c in contexts], dev)
    if model.item_id_bias is not None:
        item_rows = model.item_rows([batch.item_ids[c] for c in batch.candidate[idx].tolist()], dev)
        id_bias = model.item_id_bias.weight[item_rows, 0].float()
    else:  # no item-id rows (item_buckets 0): nothing for the item biases' posterior
        item_rows, id_bias = torch.zeros_like(rows), torch.zeros_like(logits)
    return PosteriorExamples(
        rows=rows,
        features=z,
        offsets=logits - (own * z).sum(1),
        labels=batch.labels[idx].to(dev).float(),
        late=torch.tensor(list(late), dtype=torch.bool, device=dev),
        weights=batch.weights[idx].to(dev).float(),
        item_rows=item_rows,
        item_offsets=logits - id_bias,
    )


class UserPosterior:
    """The precisions of every user's posterior and the update of both (see the module docstring)."""

    def __init__(
        self,
        mean: Tensor,
        *,
        prior_std: float,
        forgetting: float,
        newton_steps: int,
        refit_every: int = 0,
        refit_users: int = 4096,
        change_hazard: float = 0.0,
        full_prior: bool = False,
    ) -> None:
        self.mean = mean
        """``[buckets, k]``: the model's buffer, updated in place."""
        self.k = int(mean.shape[1])
        self.prior_matrix = torch.eye(self.k, device=mean.device) / (prior_std * prior_std)
        """``[k, k]``: the prior's precision matrix (empirical Bayes refits it every ``refit_every``
        updates: its diagonal only, or the whole matrix with ``full_prior``)."""
        self.full_prior = full_prior
        self.refit_every = refit_every
        self.refit_users = refit_users
        self.change_hazard = change_hazard
        self.changes = 0.0
        """Expected number of change points so far (the sum of every update's ``r``)."""
        self.forgetting = forgetting
        self.newton_steps = newton_steps
        self.rows: dict[int, int] = {}
        """Hashed user row -> its slot in :attr:`precision` (only users seen have one)."""
        self._store = torch.zeros((0, self.k, self.k), device=mean.device)
        self.updates = 0

    @property
    def precision(self) -> Tensor:
        """``[users seen, k, k]``: each seen user's posterior precision, in slot order."""
        return self._store[: len(self.rows)]

    @property
    def prior_precision(self) -> Tensor:
        """``[k]``: the prior's precision of each weight (the diagonal of :attr:`prior_matrix`)."""
        return torch.diagonal(self.prior_matrix)

    def _prior(self, n: int) -> Tensor:
        return self.prior_matrix.expand(n, self.k, self.k).clone()

    @torch.no_grad()
    def refit_prior(self) -> None:
        """Empirical Bayes: the prior's covariance := the mean over users of the posterior's second
        moment ``mu mu' + Sigma`` (the EM step of a hierarchical Gaussian model), on up to
        ``refit_users`` users seen; its diagonal only unless ``full_prior`` (then the weights'
        correlations across users, e.g. of a topic's text direction and its category, are kept).
        Every precision is ``prior + data`` (forgetting mixes towards the prior), so swapping the
        prior keeps each user's evidence."""
        n = len(self.rows)
        if n < 2:
            return
        dev = self.mean.device
        slots = torch.arange(n, device=dev)
        if n > self.refit_users:
            slots = torch.randperm(n, device=dev)[: self.refit_users]
        order = torch.tensor(list(self.rows), dtype=torch.long, device=dev)  # rows in slot order
        cov = torch.linalg.inv(self._store[slots])
        mu = self.mean[order[slots]].float()
        second = (mu[:, :, None] * mu[:, None, :] + cov).mean(0)
        if self.full_prior:
            vals, vecs = torch.linalg.eigh(second)
            new = (vecs / vals.clamp(1e-4, 1e4)) @ vecs.T
        else:
            new = torch.diag(1.0 / torch.diagonal(second).clamp(1e-4, 1e4))
        self._store[:n] += new - self.prior_matrix
        self.prior_matrix = new

    def _slots(self, users: list[int]) -> Tensor:
        new = [u for u in users if u not in self.rows]
        if new:
            start, need = len(self.rows), len(self.rows) + len(new)
            if need > self._store.shape[0]:  # grow by doubling: a slot per user seen
                grown = torch.zeros((max(need, 2 * self._store.shape[0], 64), self.k, self.k), device=self._store.device)
                grown[:start] = self._store[:start]
                self._store = grown
            for n, u in enumerate(new):
                self.rows[u] = start + n
            self._store[start:need] = self._prior(len(new))
        return torch.tensor([self.rows[u] for u in users], dtype=torch.long, device=self.mean.device)

    @torch.no_grad()
    def update(self, examples: PosteriorExamples) -> int:
        """Learn from examples (:class:`PosteriorExamples`; the offsets are the rest of the model's
        logit); returns the number of users updated."""
        rows, features, offsets, labels, late, weights = examples[:6]
        if rows.numel() == 0:
            return 0
        dev = self.mean.device
        z = features.to(dev, torch.float32)
        off = offsets.to(dev, torch.float32)
        y = labels.to(dev, torch.float32)
        w = weights.to(dev, torch.float32)
        is_late = late.to(dev).bool()
        users, inv = torch.unique(rows.to(dev), return_inverse=True)
        slots = self._slots(users.tolist())
        n_users = users.shape[0]

        shown = torch.zeros(n_users, device=dev).index_add_(0, inv, (~is_late).float())
        f = (self.forgetting ** shown)[:, None, None]
        prior = self._prior(n_users)
        prec = f * self._store[slots] + (1.0 - f) * prior
        old = self.mean[users].float()
        fresh = (~is_late).float() * w
        if self.change_hazard > 0.0:
            prec, old = self._change_point(prec, prior, old, z, off, y, fresh, inv, shown)
        mu = old.clone()
        zz = z[:, :, None] * z[:, None, :]
        # the late positives' log-likelihood ratio: gradient z, no curvature
        late_grad = torch.zeros_like(mu).index_add_(0, inv, (is_late.float() * w)[:, None] * z)
        hess = prec
        for _ in range(max(self.newton_steps, 1)):
            p = torch.sigmoid(off + (mu[inv] * z).sum(1))
            resid = fresh * (y - p)
            grad = torch.zeros_like(mu).index_add_(0, inv, resid[:, None] * z) + late_grad
            grad = grad - (prec @ (mu - old)[:, :, None]).squeeze(-1)
            curv = torch.zeros_like(prec).index_add_(0, inv, (fresh * p * (1.0 - p))[:, None, None] * zz)
            hess = prec + curv
            mu = mu + torch.linalg.solve(hess, grad)
        self._store[slots] = hess
        self.mean[users] = mu.to(self.mean.dtype)
        self.updates += 1
        if self.refit_every and self.updates % self.refit_every == 0:
            self.refit_prior()
        return n_users

    def _change_point(
        self, prec: Tensor, prior: Tensor, mean: Tensor, z: Tensor, off: Tensor, y: Tensor, fresh: Tensor,
        inv: Tensor, shown: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """A collapsed change-point step (Adams & MacKay 2007, run lengths "continue" or "restart"):
        ``r`` = the probability that the user's taste changed before this batch, from the batch's
        labels under the posterior and under the prior (each a probit-approximated predictive,
        ``sigmoid(m / sqrt(1 + pi s^2 / 8))``) and the prior odds ``change_hazard`` of a user with
        shown examples in the batch (none: no change); the posterior moves towards the prior by
        ``r`` (precision and mean)."""
        def log_lik(m: Tensor, s2: Tensor) -> Tensor:
            logit = m / torch.sqrt(1.0 + (torch.pi / 8.0) * s2)
            ll = -torch.nn.functional.binary_cross_entropy_with_logits(logit, y, reduction="none")
            return torch.zeros_like(shown).index_add_(0, inv, fresh * ll)

        cov = torch.linalg.inv(prec)[inv]
        stay = log_lik(off + (mean[inv] * z).sum(1), ((cov @ z[:, :, None]).squeeze(-1) * z).sum(1))
        prior_cov = torch.linalg.inv(self.prior_matrix)
        restart = log_lik(off, ((z @ prior_cov) * z).sum(1))
        h = torch.where(shown > 0, self.change_hazard, 0.0).clamp(1e-12, 1.0 - 1e-12)
        r = torch.sigmoid(restart - stay + torch.log(h) - torch.log1p(-h))
        self.changes += float(r.sum())
        return prec + r[:, None, None] * (prior - prec), (1.0 - r)[:, None] * mean

    @torch.no_grad()
    def sample(self, row: int, *, scale: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        """One draw of user ``row``'s weights from ``N(mean, scale^2 precision^-1)`` (Thompson
        sampling; a user not seen yet draws around its mean with the prior's precision)."""
        slot = self.rows.get(int(row))
        prec = self._store[slot] if slot is not None else self.prior_matrix
        chol = torch.linalg.cholesky(prec.float().cpu())  # precision = C C'; C'^-1 eps has covariance precision^-1
        eps = torch.randn(self.k, 1, generator=generator)
        draw = torch.linalg.solve_triangular(chol.T, eps, upper=True)[:, 0]
        return self.mean[int(row)].float() + scale * draw.to(self.mean.device)

    # --- checkpoint ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        rows = sorted(self.rows, key=self.rows.__getitem__)
        return {
            "rows": rows,
            "precision": self.precision.detach().cpu().clone(),
            "prior_matrix": self.prior_matrix.detach().cpu().clone(),
            "updates": self.updates,
            "changes": self.changes,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        precision = state["precision"].to(self.mean.device, torch.float32)
        if precision.ndim != 3 or precision.shape[1:] != (self.k, self.k) or precision.shape[0] != len(state["rows"]):
            raise ValueError(f"posterior state of shape {tuple(precision.shape)} does not fit k={self.k}")
        self.rows = {int(r): n for n, r in enumerate(state["rows"])}
        self._store = precision.clone()
        if "prior_matrix" in state:
            self.prior_matrix = state["prior_matrix"].to(self.mean.device, torch.float32).clone()
        else:  # a checkpoint from before the full prior: the diagonal's precisions
            self.prior_matrix = torch.diag(state["prior_precision"].to(self.mean.device, torch.float32))
        self.updates = int(state["updates"])
        self.changes = float(state.get("changes", 0.0))


class ItemBiasPosterior:
    """The item-id biases as a per-item random effect (GLMix's per-item model, with one feature: 1).

    Each item's bias ``b_i`` has a Gaussian posterior under the prior ``N(0, s^2)``: a
    :class:`UserPosterior` with one feature (1) whose rows are the items' hashed id rows and whose
    offset is the rest of the click logit.  How much items differ is a property of the stream: on MovieLens clicks are
    mostly popularity and the biases must be large, on a stream whose slates are drawn uniformly
    they are mostly noise.  A row-wise Adagrad rate fits one of the two (0.1: MovieLens-20k 0.871,
    the synthetic stream 0.687; 0.03: 0.867 and 0.693), and an empirical-Bayes refit of ``s``
    from the posteriors stays where it starts, because the rest of the model learns by gradient
    whatever the biases leave out (on MovieLens, started at std 0.1 it settled at 0.12, started at
    1 at 0.93).

    So a grid of priors ``prior_stds`` runs side by side, each with its own posterior of every
    item, and the one whose predictions of the batches *before* learning from them were the most
    likely (the prequential log-likelihood, which for a Bayesian model is its evidence) is the
    model's: its means are written into ``RecModel.item_id_bias`` after every update.  A grid of
    hypotheses weighed by their evidence is a discrete hyperprior, as in Bayesian model selection.

    Forgetting (``forgetting < 1``): per shown example, an item's precision decays towards the
    prior's, so a bias can follow a change of popularity.  Each prior holds a mean per hashed row
    and a precision per item seen.
    """

    def __init__(self, bias: Tensor, *, prior_stds: Sequence[float], forgetting: float = 1.0, newton_steps: int = 2) -> None:
        if not prior_stds:
            raise ValueError("ItemBiasPosterior needs at least one prior std")
        self.bias = bias
        """``[buckets, 1]``: the model's ``item_id_bias`` weight, written in place."""
        self.prior_stds = [float(s) for s in prior_stds]
        self.grid = [
            UserPosterior(torch.zeros_like(bias), prior_std=s, forgetting=forgetting, newton_steps=newton_steps)
            for s in self.prior_stds
        ]
        """One posterior per prior std, each with its own means (``[buckets, 1]``)."""
        self.evidence = torch.zeros(len(self.grid), device=bias.device, dtype=torch.float64)
        """Each prior's prequential log-likelihood so far (the labels, predicted before learning them)."""
        self.updates = 0

    @property
    def chosen(self) -> int:
        """Index in :attr:`prior_stds` of the prior whose means the model uses."""
        return int(torch.argmax(self.evidence))

    @torch.no_grad()
    def update(self, examples: PosteriorExamples) -> int:
        """Learn from the examples' item rows and item offsets; returns the number of items updated."""
        if examples.item_rows.numel() == 0:
            return 0
        dev = self.bias.device
        rows = examples.item_rows.to(dev)
        off = examples.item_offsets.to(dev, torch.float32)
        y = examples.labels.to(dev, torch.float32)
        fresh = (~examples.late.to(dev).bool()).float() * examples.weights.to(dev, torch.float32)
        for g, post in enumerate(self.grid):  # the evidence: each prior's predictions before it learns
            p = torch.sigmoid(off + post.mean[rows, 0])
            self.evidence[g] += float((fresh * torch.log(torch.where(y > 0.5, p, 1.0 - p).clamp_min(1e-12))).sum())
        as_items = examples._replace(rows=rows, features=torch.ones((rows.shape[0], 1), device=dev), offsets=off)
        items = 0
        for post in self.grid:
            items = post.update(as_items)
        self.bias.copy_(self.grid[self.chosen].mean)
        self.updates += 1
        return items

    # --- checkpoint ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "prior_stds": list(self.prior_stds),
            "means": torch.stack([p.mean.detach().cpu() for p in self.grid]),
            "grid": [p.state_dict() for p in self.grid],
            "evidence": self.evidence.detach().cpu().clone(),
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        means = state["means"]
        if list(state["prior_stds"]) != self.prior_stds or tuple(means.shape[1:]) != tuple(self.bias.shape):
            raise ValueError(
                f"item-bias posterior state for priors {state['prior_stds']} and shape {tuple(means.shape[1:])} "
                f"does not fit priors {self.prior_stds} and shape {tuple(self.bias.shape)}"
            )
        for post, mean, sub in zip(self.grid, means, state["grid"], strict=True):
            post.mean.copy_(mean)
            post.load_state_dict(sub)
        self.evidence = state["evidence"].to(self.bias.device, torch.float64).clone()
        self.updates = int(state["updates"])
        self.bias.copy_(self.grid[self.chosen].mean)
