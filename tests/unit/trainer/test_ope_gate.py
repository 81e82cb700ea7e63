"""The guardrail's optional OPE gate (STREAMREC_TRAINER_OPE_GATE): each version's top-1 policy over the
catalog, estimated on held-back exploration examples; report = manifest metrics, on = also a refusal."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from contract.records import Item, Labeled, example_id
from trainer.catalog import Catalog
from trainer.guardrail import Refusal, ope_passes
from trainer.holdout import Holdout, catalog_top1
from trainer.service_settings import TrainerSettings

ITEMS = ["good", "meh", "bad", "worse"]
CTR = {"good": 0.6, "meh": 0.2, "bad": 0.05, "worse": 0.05}


class _PrefModel:
    """A RecModel stand-in with the serving API: every user scores ``favourite`` highest."""

    def __init__(self, favourite: str) -> None:
        self.favourite, self.training = favourite, True
        self.config = SimpleNamespace(max_history=5)
        self.modes: list[bool] = []

    def eval(self) -> None:
        self.training = False

    def train(self, mode: bool = True) -> None:
        self.modes.append(mode)
        self.training = mode

    def encode_items(self, texts, item_ids, text_hashes, categories) -> torch.Tensor:  # noqa: ANN001
        return torch.stack([torch.nn.functional.one_hot(torch.tensor(sorted(ITEMS).index(i)), 4).float()
                            for i in item_ids])

    def encode_users_indexed(self, vecs, hist, mask, user_ids) -> torch.Tensor:  # noqa: ANN001
        pref = torch.full((4,), -2.0)
        pref[sorted(ITEMS).index(self.favourite)] = 2.0
        pref[sorted(ITEMS).index("meh")] = 0.0
        return pref.repeat(len(user_ids), 1)

    def score_matrix(self, users: torch.Tensor, vecs: torch.Tensor) -> torch.Tensor:
        return users @ vecs.T


class _Learner:
    """What Holdout.judge needs of a ContinualLearner: the same predictions for every model."""

    def __init__(self, model: _PrefModel) -> None:
        self.model, self.device = model, torch.device("cpu")
        self.catalog = Catalog(Item(item_id=i, text=f"text of {i}", ts=1) for i in ITEMS)

    def predict(self, examples: list[Labeled], model: object = None) -> tuple[list[float], list[int]]:
        return [0.3] * len(examples), list(range(len(examples)))


def _log(n: int, seed: int = 0) -> list[Labeled]:
    """Uniform exploration at position 0 (propensity 1/4), clicks at each item's CTR."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        item = ITEMS[int(rng.integers(4))]
        out.append(Labeled(example_id=example_id(f"imp{k}", item), impression_id=f"imp{k}", user_id=f"u{k % 7}",
                           item_id=item, position=0, label=int(rng.random() < CTR[item]), history=["meh"],
                           impression_ts=k, label_ts=k, ts=k, propensity=0.25, model_version="3"))
    return out


def _holdout(tmp_path: Path, gate: str, live: str | None, n: int = 800) -> Holdout:
    settings = TrainerSettings(weights_root=str(tmp_path / "w"), checkpoint_dir=tmp_path / "c", metrics_port=0,
                               holdout_size=n, ope_gate=gate, ope_min_examples=100)
    h = Holdout(settings)
    log = _log(n)
    h.examples.extend(log)  # as split() keeps them
    h.ope_examples.extend(log)
    if live is not None:
        h.live_model, h.live_version = _PrefModel(live), 3  # type: ignore[assignment]
    return h


def test_ope_passes_refuses_only_on_evidence() -> None:
    kw = {"estimator": "snips", "margin": 0.01, "z": 1.64, "min_examples": 100}
    assert ope_passes(-0.2, 0.05, examples=500, **kw)[:2] == (False, Refusal.WORSE_BY_OPE)
    assert ope_passes(-0.05, 0.05, examples=500, **kw)[0]  # within margin + z * se
    assert ope_passes(-0.2, 0.05, examples=50, **kw)[0]  # too few logged examples: not judged
    assert ope_passes(float("nan"), 0.05, examples=500, **kw)[0]  # undefined: not judged


def test_catalog_top1_ranks_the_whole_catalog_and_skips_contexts_without_history() -> None:
    model = _PrefModel("bad")
    learner = _Learner(model)
    ctx = _log(3)
    no_history = ctx[2].model_copy(update={"history": ["unknown-item"]})
    tops, probs = catalog_top1(model, learner.catalog, [ctx[0], ctx[1], no_history], max_history=5,  # type: ignore[arg-type]
                               device="cpu", ask=[["good"], ["meh"], ["good"]])
    assert tops == ["bad", "bad", None]
    assert probs[0] == pytest.approx({"good": float(torch.sigmoid(torch.tensor(-2.0))),
                                      "bad": float(torch.sigmoid(torch.tensor(2.0)))})
    assert probs[2] == {}
    assert model.training and model.modes[-1] is True  # back in training mode


def test_report_puts_the_estimates_in_the_manifest_metrics_without_refusing(tmp_path: Path) -> None:
    h = _holdout(tmp_path, "report", live="good")
    verdict = h.judge(_Learner(_PrefModel("bad")))  # type: ignore[arg-type]
    assert verdict.ok
    m = verdict.metrics
    assert m["ope_examples"] == 800
    for kind in ("ips", "snips", "dr"):
        assert m[f"ope_{kind}"] == pytest.approx(CTR["bad"], abs=0.05)
        assert m[f"live_ope_{kind}"] == pytest.approx(CTR["good"], abs=0.08)
        assert m[f"ope_{kind}_diff"] == pytest.approx(m[f"ope_{kind}"] - m[f"live_ope_{kind}"])
        assert m[f"ope_{kind}_diff_se"] > 0


def test_on_refuses_a_candidate_worse_by_ope_and_passes_a_better_one(tmp_path: Path) -> None:
    worse = _holdout(tmp_path, "on", live="good").judge(_Learner(_PrefModel("bad")))  # type: ignore[arg-type]
    assert not worse.ok and worse.refusal is Refusal.WORSE_BY_OPE
    assert "off-policy" in worse.why
    better = _holdout(tmp_path, "on", live="bad").judge(_Learner(_PrefModel("good")))  # type: ignore[arg-type]
    assert better.ok and better.metrics["ope_snips_diff"] > 0


def test_off_computes_nothing_and_no_live_version_reports_the_candidate(tmp_path: Path) -> None:
    off = _holdout(tmp_path, "off", live="good").judge(_Learner(_PrefModel("bad")))  # type: ignore[arg-type]
    assert not any(k.startswith(("ope_", "live_ope_")) for k in off.metrics)
    first = _holdout(tmp_path, "on", live=None)
    verdict = first.judge(_Learner(_PrefModel("good")))  # type: ignore[arg-type]
    # no live version: the popularity rule decides; the candidate's own estimate is recorded
    assert verdict.metrics["ope_snips"] == pytest.approx(CTR["good"], abs=0.08)
    assert "live_ope_snips" not in verdict.metrics


def test_split_keeps_only_explored_position_0_examples_and_the_checkpoint_keeps_them(tmp_path: Path) -> None:
    settings = TrainerSettings(weights_root=str(tmp_path / "w"), checkpoint_dir=tmp_path / "c", metrics_port=0,
                               holdout_fraction=0.5, ope_gate="report")
    h = Holdout(settings)
    log = _log(200)
    deeper = [ex.model_copy(update={"position": 1}) for ex in log[:50]]
    unlogged = [ex.model_copy(update={"propensity": None}) for ex in log[50:100]]
    _, held = h.split(log[100:] + deeper + unlogged)
    assert 0 < len(h.ope_examples) < len(held)
    assert all(ex.position == 0 and ex.propensity is not None for ex in h.ope_examples)
    again = Holdout(settings)
    again.restore(h.state(), store=None, device="cpu", model=None)  # type: ignore[arg-type]
    assert list(again.ope_examples) == list(h.ope_examples)


def test_catalog_top1_of_a_real_model_is_the_argmax_of_its_predictions() -> None:
    """The gate's policy ranks the catalog exactly as the learner scores (context, item) pairs."""
    from trainer.learner import ContinualLearner, LearnerConfig
    from trainer.model import ModelConfig, build_model

    catalog = Catalog(Item(item_id=f"i{n:02d}", text=f"{w} story number {n}", categories=["a" if n % 2 else "b"], ts=1)
                      for n, w in enumerate(["space", "cooking", "football", "music", "garden", "sailing"] * 2))
    model = build_model(ModelConfig(encoder_layers=1, max_text_len=16, embed_dim=16, categories=["a", "b"],
                                    max_history=4, seed=3))
    learner = ContinualLearner(model, LearnerConfig(device="cpu"), catalog)
    torch.manual_seed(0)
    with torch.no_grad():  # make the id parts matter, so the ranking is not the text alone
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    contexts = [Labeled(example_id=example_id(f"c{u}", "i00"), impression_id=f"c{u}", user_id=f"u{u}",
                        item_id="i00", position=0, label=0, history=[f"i{(u + j) % 12:02d}" for j in range(3)],
                        impression_ts=1, label_ts=1, ts=1, propensity=0.5) for u in range(5)]
    learner.predict(contexts)  # a fresh model is centred on first use (the guardrail predicts first too)
    tops, probs = catalog_top1(model, catalog, contexts, max_history=4, device="cpu",
                               ask=[catalog.item_ids() for _ in contexts])
    for ctx, top, pr in zip(contexts, tops, probs, strict=True):
        pairs = [ctx.model_copy(update={"item_id": i, "example_id": example_id(ctx.impression_id, i)})
                 for i in catalog.item_ids()]
        p, kept = learner.predict(pairs)
        assert len(kept) == 12
        assert top == pairs[int(np.argmax(p))].item_id
        assert [pr[i] for i in catalog.item_ids()] == pytest.approx(list(p), abs=1e-5)
