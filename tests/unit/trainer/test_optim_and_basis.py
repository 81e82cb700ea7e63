"""Row-wise Adagrad, the principal text basis, and replay that leaves the user rows alone: tiny sizes."""

from __future__ import annotations

import pytest
import torch

from contract.records import Item, Labeled
from trainer.catalog import Catalog
from trainer.learner import ContinualLearner, LearnerConfig
from trainer.model import ModelConfig, build_model
from trainer.model_config import user_bucket
from trainer.optim import RowAdagrad
from trainer.towers import ItemTower

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- RowAdagrad
def test_row_adagrad_moves_a_row_along_its_raw_gradient_and_leaves_other_rows_alone() -> None:
    table = torch.nn.Parameter(torch.zeros(3, 4))
    opt = RowAdagrad([table], lr=0.5)
    table.grad = torch.tensor([[1.0, 0.1, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, -2.0]])
    opt.step()
    row0 = table.detach()[0]
    # one accumulator per row: the step keeps the gradient's direction (per-coordinate Adagrad
    # would move both touched coordinates by the same lr)
    assert torch.allclose(row0[1] / row0[0], torch.tensor(0.1))
    assert torch.equal(table.detach()[1], torch.zeros(4))  # untouched row: no move
    assert table.detach()[2, 3] > 0


def test_row_adagrad_steps_shrink_with_evidence_unless_it_forgets() -> None:
    def steps(decay: float) -> list[float]:
        p = torch.nn.Parameter(torch.zeros(1, 2))
        opt = RowAdagrad([p], lr=1.0, decay=decay)
        out = []
        for _ in range(50):
            before = p.detach().clone()
            p.grad = torch.ones(1, 2)
            opt.step()
            out.append(float((before - p.detach()).abs().max()))
        return out

    plain, forgetting = steps(1.0), steps(0.9)
    assert plain[-1] < 0.2 * plain[0]  # ~1/sqrt(n), like a counter's average
    assert forgetting[-1] > 2 * plain[-1]  # a floor: a row that has seen much can still follow a change


def test_row_adagrad_rejects_settings_that_cannot_work() -> None:
    p = torch.nn.Parameter(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="decay"):
        RowAdagrad([p], decay=0.0)
    with pytest.raises(ValueError, match="lr"):
        RowAdagrad([p], lr=-1.0)


# --------------------------------------------------------------------------- principal basis
def _tower(embed_dim: int = 8) -> ItemTower:
    model = build_model(ModelConfig(encoder_layers=1, freeze_layers=1, max_text_len=8, embed_dim=embed_dim))
    return model.item_tower


def test_principal_basis_leads_with_the_catalogs_main_direction_and_keeps_the_length() -> None:
    torch.manual_seed(0)
    tower = _tower()
    hidden = tower.hidden
    # 200 "texts": a strong shared axis of variation, a weaker one, and noise
    a, b = torch.randn(hidden), torch.randn(hidden)
    coef = torch.randn(200, 2) * torch.tensor([5.0, 2.0])
    pooled = 3.0 + coef[:, :1] * a + coef[:, 1:] * b + 0.1 * torch.randn(200, hidden)
    random_len = (tower.proj(pooled - pooled.mean(0)) - tower.proj.bias).norm(dim=1).mean()
    tower.center(pooled, principal=True)
    out = tower.proj(pooled)
    assert torch.allclose(out.mean(0), torch.zeros(out.shape[1]), atol=1e-3)  # centred
    assert torch.allclose(out.norm(dim=1).mean(), random_len, rtol=1e-3)  # same mean length as before
    share = out.var(0) / out.var(0).sum()
    assert share[0] > 0.6 and share[0] > share[1] > share[2:].max()
    assert bool(tower.centred)


def test_principal_basis_needs_enough_items_else_only_centres() -> None:
    tower = _tower()
    before = tower.proj.weight.detach().clone()
    pooled = torch.randn(ItemTower.PRINCIPAL_MIN_ITEMS - 1, tower.hidden)
    tower.center(pooled, principal=True)
    assert torch.equal(tower.proj.weight.detach(), before)  # too few items to estimate directions
    assert torch.allclose(tower.proj(pooled).mean(0), torch.zeros(before.shape[0]), atol=1e-4)


# --------------------------------------------------------------------------- replay and the user rows
ITEMS = [Item(item_id=f"i{k}", text=f"item number {k}", categories=[], ts=1) for k in range(4)]


def _examples(user: str, start: int, n: int) -> list[Labeled]:
    return [
        Labeled(
            example_id=f"{user}-{k}:{ITEMS[k % 4].item_id}", impression_id=f"{user}-{k}", user_id=user,
            item_id=ITEMS[k % 4].item_id,
            position=0, label=k % 2, history=[], impression_ts=k, label_ts=k, ts=k,
        )
        for k in range(start, start + n)
    ]


@pytest.mark.parametrize("replay_ids", [False, True])
def test_replayed_examples_train_the_user_rows_only_when_asked(replay_ids: bool) -> None:
    config = ModelConfig(encoder_layers=1, freeze_layers=1, max_text_len=8, embed_dim=8, max_history=2,
                         item_buckets=64, user_buckets=64)
    learner = ContinualLearner(
        build_model(config),
        LearnerConfig(device="cpu", replay_size=100, replay_ratio=1.0, distill_weight=0.0, replay_ids=replay_ids),
        Catalog(ITEMS),
    )
    learner.step(_examples("old-user", 0, 16))  # fills the replay buffer with old-user's labels
    rows = learner.model.user_row_parameters()
    before = [p.detach().clone() for p in rows]
    learner.step(_examples("new-user", 100, 16))  # old-user appears only in the replayed part
    r = user_bucket("old-user", config.user_buckets)
    moved = any(not torch.equal(p.detach()[r], b[r]) for p, b in zip(rows, before, strict=True))
    assert moved is replay_ids
    new = user_bucket("new-user", config.user_buckets)
    assert any(not torch.equal(p.detach()[new], b[new]) for p, b in zip(rows, before, strict=True))
