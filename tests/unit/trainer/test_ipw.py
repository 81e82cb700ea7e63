"""Inverse-propensity weighting of the click loss (STREAMREC_TRAINER_IPW_CLIP): off by default, and
when on each example's gradient is scaled by min(1/propensity, clip), normalised by the weights' sum."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from contract.errors import ConfigError
from contract.records import Item, Labeled, example_id
from contract.settings import load
from trainer.batching import build_batch
from trainer.catalog import Catalog
from trainer.losses import RecTrain, ipw_weights
from trainer.model import ModelOutput, TaskWeights
from trainer.service_settings import TrainerSettings

PROPS = [0.5, None, 0.05, 1.0]
LABELS = [1, 0, 1, 0]


def _examples() -> tuple[Catalog, list[Labeled]]:
    catalog = Catalog(Item(item_id=f"i{n}", text=f"item {n}", ts=1) for n in range(4))
    exs = [Labeled(example_id=example_id("imp", f"i{n}"), impression_id="imp", user_id="u", item_id=f"i{n}",
                   position=n, label=y, impression_ts=1, label_ts=2, ts=2, propensity=p)
           for n, (p, y) in enumerate(zip(PROPS, LABELS, strict=True))]
    return catalog, exs


def _grad(clip: float, downsample: list[float] | None = None) -> torch.Tensor:
    """d(click loss)/d(logits) for fixed logits, through RecTrain.losses."""
    catalog, exs = _examples()
    batch, kept = build_batch(exs, catalog, max_history=0, weights=downsample)
    assert kept == [0, 1, 2, 3]
    logits = torch.tensor([0.3, -0.2, 1.0, 0.1], requires_grad=True)
    out = ModelOutput(click_logits=logits, item_vecs=torch.zeros(4, 2), user_vecs=torch.zeros(4, 2),
                      category_logits=None, value_pred=None)
    stub = SimpleNamespace(config=SimpleNamespace(task_weights=TaskWeights()), position_logits=lambda position: None)
    train = RecTrain.__new__(RecTrain)  # the losses only, without a model to build
    torch.nn.Module.__init__(train)
    train.model, train.distill_weight, train.distill_temperature, train.ipw_clip = stub, 0.0, 1.0, clip
    total, parts, _ = train.losses(batch, out)
    total.backward()
    assert parts["click"] == pytest.approx(float(total.detach()))
    return logits.grad.detach().clone()


def test_batch_carries_the_logged_propensity_and_one_where_none() -> None:
    catalog, exs = _examples()
    batch, _ = build_batch(exs, catalog, max_history=0)
    assert batch.propensity.tolist() == pytest.approx([0.5, 1.0, 0.05, 1.0])
    assert batch.to("cpu").propensity.tolist() == pytest.approx([0.5, 1.0, 0.05, 1.0])


def test_ipw_weights() -> None:
    p = torch.tensor([0.5, 1.0, 0.05, 1.0])
    assert ipw_weights(p, 0.0).tolist() == [1.0] * 4  # off
    assert ipw_weights(p, 10.0).tolist() == pytest.approx([2.0, 1.0, 10.0, 1.0])  # 1/0.05 = 20, clipped
    assert ipw_weights(p, 100.0).tolist() == pytest.approx([2.0, 1.0, 20.0, 1.0])


def test_weights_change_the_gradient_as_expected() -> None:
    logits = torch.tensor([0.3, -0.2, 1.0, 0.1])
    resid = torch.sigmoid(logits) - torch.tensor(LABELS, dtype=torch.float32)  # d bce / d logit
    off = _grad(0.0)
    assert off == pytest.approx(resid / 4)  # unweighted: the mean
    for clip, w in ((10.0, [2.0, 1.0, 10.0, 1.0]), (1.5, [1.5, 1.0, 1.5, 1.0])):
        wt = torch.tensor(w)
        assert _grad(clip) == pytest.approx(wt * resid / wt.sum())
    # IPW multiplies the negative-downsampling weights that the learner passes in
    down = [1.0, 4.0, 1.0, 4.0]
    wt = torch.tensor([2.0 * 1, 1.0 * 4, 10.0 * 1, 1.0 * 4])
    assert _grad(10.0, down) == pytest.approx(wt * resid / wt.sum())


def test_ipw_clip_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STREAMREC_TRAINER_IPW_CLIP", raising=False)
    assert load(TrainerSettings).ipw_clip == 0.0  # off by default
    monkeypatch.setenv("STREAMREC_TRAINER_IPW_CLIP", "20")
    assert load(TrainerSettings).ipw_clip == 20.0
    monkeypatch.setenv("STREAMREC_TRAINER_IPW_CLIP", "0.5")  # a weight cap below 1 would down-weight everything
    with pytest.raises(ConfigError, match="STREAMREC_TRAINER_IPW_CLIP"):
        load(TrainerSettings)
