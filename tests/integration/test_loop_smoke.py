"""The closed loop closes: one arm of ``make loop`` (exploring continual system) on a tiny world.

Simulated users ask the real scoring agent, are shown its answers and click; the join labels
the impressions, the trainer publishes versions, and a trained version answers requests. The
impressions carry the agent's propensities, request_id and model_version, and so do the
labeled examples made from them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from contract.records import Impression, Labeled
from contract.settings import KafkaSettings
from contract.topics import IMPRESSIONS, LABELED
from harness.loop import Arm, run_arm
from streams.replay.simulate import LoopConfig
from tests.kafka_utils import consume

pytestmark = pytest.mark.integration

TEST_TRAINER = {
    "encoder_layers": 1,
    "freeze_layers": 1,
    "max_text_len": 16,
    "batch_size": 64,
    "publish_every_s": 3,
    "holdout_fraction": 0,  # no guardrail: the test is about the loop closing, not about quality
}


def test_the_loop_closes(kafka_settings: KafkaSettings, tmp_path: Path) -> None:
    cfg = LoopConfig(users=30, items=60, new_items=5, requests=700, k=5, rate=20.0, window=100)
    arm = Arm("explore", "continual + epsilon", explore="epsilon")
    res = run_arm(kafka_settings, arm, cfg, tmp_path, trainer=TEST_TRAINER, ready_timeout_s=120)
    outcomes = res.run.outcomes
    assert len(outcomes) == cfg.requests
    # every answer explored with a propensity per item, and a trained version answered some
    assert all(o.propensities is not None and len(o.propensities) == cfg.k for o in outcomes)
    trained = [o for o in outcomes if o.trained]
    assert trained, {o.model_version for o in outcomes}
    assert res.run.produced["impressions"] == cfg.requests and res.run.produced["items"] == 5

    impressions = consume(kafka_settings, IMPRESSIONS, count=cfg.requests, timeout=30)
    by_id = {o.request_id: o for o in outcomes}
    assert len(impressions) == cfg.requests
    for imp in impressions:
        assert isinstance(imp, Impression)
        o = by_id[imp.request_id]
        assert imp.impression_id == o.request_id
        assert imp.model_version == o.model_version
        assert tuple(imp.items) == o.items
        assert imp.propensities is not None and tuple(imp.propensities) == o.propensities
        assert imp.ts == o.ts

    labeled = consume(kafka_settings, LABELED, count=10**6, timeout=5)
    assert labeled
    imps = {i.impression_id: i for i in impressions}
    for ex in labeled:
        assert isinstance(ex, Labeled)
        imp = imps[ex.impression_id]
        assert ex.propensity == imp.propensities[ex.position]  # type: ignore[index]
        assert ex.model_version == imp.model_version
    # the slates the trained versions chose came back as labeled examples
    assert any(
        ex.model_version is not None and not ex.model_version.startswith("fallback:")
        for ex in labeled
    )
