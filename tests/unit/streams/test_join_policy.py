"""The logging policy travels through the join: each labeled example carries its impression's
propensity at the item's position and the serving model_version (issue 13, item 1)."""

from __future__ import annotations

from contract.records import Click, Impression, Labeled
from streams.join import Example, JoinConfig, JoinCore, reference_join

NOW_MS = 1_790_000_000_000


def test_examples_carry_propensity_position_and_model_version() -> None:
    clock = [0.0]
    core = JoinCore(JoinConfig(window_ms=1_000, allowed_lateness_ms=0), clock=lambda: clock[0])
    imp = Impression(
        impression_id="r1", user_id="u", items=["a", "b", "c"], ts=1_000,
        propensities=[0.5, 0.25, 1.0], request_id="req-1", model_version="7",
    )  # fmt: skip
    plain = Impression(impression_id="r2", user_id="u", items=["a"], ts=1_000)
    out = core.on_impression(imp) + core.on_impression(plain)
    out += core.on_click(Click(impression_id="r1", user_id="u", item_id="b", ts=1_500))
    # a restore in the middle keeps them
    core = JoinCore.restore(core.config, list(core.snapshot().items()), clock=lambda: clock[0])
    out += core.on_click(Click(impression_id="r1", user_id="u", item_id="c", ts=5_000))  # late
    clock[0] = 100.0
    out += core.tick()
    examples = {(e.example_id, e.label): e for e in out if isinstance(e, Example)}
    want = {("r1:a", 0): 0.5, ("r1:b", 1): 0.25, ("r1:c", 0): 1.0, ("r1:c", 1): 1.0}
    for key, propensity in want.items():
        ex = examples[key]
        assert (ex.propensity, ex.model_version) == (propensity, "7")
        record = Labeled.from_json(ex.to_json())
        assert record == ex.to_record()
        assert (record.propensity, record.model_version, record.position) == (propensity, "7", ex.position)
    assert examples[("r1:b", 1)].position == 1
    plain_record = Labeled.from_json(examples[("r2:a", 0)].to_json())
    assert plain_record.propensity is None and plain_record.model_version is None
    ref = reference_join([imp, plain], [], window_ms=1_000)
    assert {(e.example_id, e.propensity, e.model_version) for e in ref.examples} == {
        ("r1:a", 0.5, "7"), ("r1:b", 0.25, "7"), ("r1:c", 1.0, "7"), ("r2:a", None, None),
    }  # fmt: skip
