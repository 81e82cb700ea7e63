"""The synthetic world: reproducible, ordered, with a known click model, new items and a drift."""

from __future__ import annotations

import itertools
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from contract.errors import ConfigError
from contract.topics import CLICKS, IMPRESSIONS, ITEMS
from streams.replay import cli
from streams.replay.synthetic import THEMES, SyntheticConfig, SyntheticStream, auc, best_auc

SMALL = SyntheticConfig(users=50, items=60, new_items=20, events=2_000, seed=3)


@pytest.fixture(scope="module")
def world() -> SyntheticStream:
    return SyntheticStream(SMALL)


@pytest.fixture(scope="module")
def stream(world: SyntheticStream) -> list:
    return list(world.stream())


def _check_stream(world: SyntheticStream, stream: list) -> None:
    """The invariants every synthetic stream keeps, whatever its configuration."""
    assert Counter(s.name for s, _ in stream) == {k: v for k, v in world.counts().items() if v}
    ts = [r.ts for _, r in stream]
    assert ts == sorted(ts)
    known: set[str] = set()
    shown: dict[str, tuple[int, list[str]]] = {}
    for n, (spec, rec) in enumerate(stream):
        assert isinstance(rec, spec.record)
        if spec is ITEMS:
            known.add(rec.item_id)
        elif spec is IMPRESSIONS:
            assert set(rec.items) <= known, "an item was shown before its Item record"
            assert len(rec.items) == world.config.slate_size
            shown[rec.impression_id] = (n, rec.items)
        else:
            index, items = shown[rec.impression_id]
            assert index < n and rec.item_id in items


def test_the_stream_is_ordered_and_consistent(world: SyntheticStream, stream: list) -> None:
    _check_stream(world, stream)
    assert world.time_range() == (stream[0][1].ts, stream[-1][1].ts)


def test_every_record_satisfies_the_contract(stream: list) -> None:
    for spec, rec in stream:
        assert spec.record.from_json(rec.to_json()) == rec


def test_same_seed_same_stream_other_seed_another(stream: list) -> None:
    again = list(SyntheticStream(SMALL).stream())
    assert [r.to_json() for _, r in again] == [r.to_json() for _, r in stream]
    other = SyntheticStream(SyntheticConfig(**{**SMALL.__dict__, "seed": 4}))
    assert [r.to_json() for _, r in other.stream()] != [r.to_json() for _, r in stream]


def test_clicks_are_the_sampled_labels(world: SyntheticStream, stream: list) -> None:
    clicks = {(r.impression_id, r.item_id) for s, r in stream if s is CLICKS}
    positives = {(t.impression_id, t.item_id) for t in world.truth() if t.label == 1}
    assert clicks == positives
    assert len(world.truth()) == SMALL.events * SMALL.slate_size


def test_true_probabilities_are_exposed_consistently(world: SyntheticStream, stream: list) -> None:
    assert ((world.p_click > 0) & (world.p_click < 1)).all()
    impressions = [r for s, r in stream if s is IMPRESSIONS]
    for imp in impressions[::10]:
        assert imp.context["synthetic"] is True
        ps = imp.context["p_click"]
        assert ps == [world.true_probability(imp.impression_id, i) for i in imp.items]
        assert ps == [world.probability(imp.user_id, i, imp.ts) for i in imp.items]
    with pytest.raises(KeyError, match="not shown"):
        imp = impressions[0]
        world.true_probability(
            imp.impression_id, next(i for i in world.item_ids if i not in imp.items)
        )
    with pytest.raises(KeyError, match="unknown synthetic impression"):
        world.true_probability("nope", world.item_ids[0])


def test_the_formula_of_the_docstring(world: SyntheticStream) -> None:
    u, i = 7, 11
    theta, phi = world.interests_before[u], world.item_topics[i]
    want = 1 / (1 + np.exp(-(SMALL.sharpness * float(theta @ phi) + SMALL.bias)))
    assert world.probability(
        world.user_ids[u], world.item_ids[i], SMALL.start_ts_ms
    ) == pytest.approx(want)


def test_the_interest_shift_changes_probabilities_after_the_shift(world: SyntheticStream) -> None:
    assert world.shift_ts is not None
    before, after = world.shift_ts - 1, world.shift_ts
    shifted = set(world.shifted_users.tolist())
    assert len(shifted) == round(SMALL.shift_fraction * SMALL.users)

    def change(u: int) -> float:
        user = world.user_ids[u]
        return float(
            np.mean(
                [
                    abs(world.probability(user, i, after) - world.probability(user, i, before))
                    for i in world.item_ids
                ]
            )
        )

    assert all(change(u) == 0.0 for u in range(SMALL.users) if u not in shifted)
    changes = [change(u) for u in sorted(shifted)]
    assert np.mean(changes) > 0.05 and sum(c > 0.01 for c in changes) >= 0.8 * len(shifted)
    # the shown probabilities of shifted users, before vs after, come from different interests
    ts = world.impression_ts
    for u in list(shifted)[:5]:
        rows = world.impression_user == u
        recomputed = world._probability(
            np.full(rows.sum(), u)[:, None], world.slates[rows], np.zeros((rows.sum(), 1))
        )
        late = ts[rows] >= world.shift_ts
        assert np.allclose(recomputed[~late], world.p_click[rows][~late])
        if late.any():
            assert not np.allclose(recomputed[late], world.p_click[rows][late])


def test_no_shift_when_disabled() -> None:
    calm = SyntheticStream(
        SyntheticConfig(users=20, items=30, new_items=0, events=200, shift_at=None)
    )
    assert calm.shift_ts is None and len(calm.shifted_users) == 0
    assert np.array_equal(calm.interests_before, calm.interests_after)


def test_new_items_arrive_mid_stream_and_get_shown(world: SyntheticStream, stream: list) -> None:
    first_item = {}
    first_shown = {}
    for n, (spec, rec) in enumerate(stream):
        if spec is ITEMS:
            first_item[rec.item_id] = (n, rec.ts)
        elif spec is IMPRESSIONS:
            for i in rec.items:
                first_shown.setdefault(i, n)
    new = world.item_ids[SMALL.items :]
    assert len(new) == SMALL.new_items
    assert all(first_item[i][1] > SMALL.start_ts_ms for i in new)
    assert all(first_item[i][0] < first_shown[i] for i in first_shown)
    assert sum(i in first_shown for i in new) >= SMALL.new_items // 2


def test_best_auc_is_the_ceiling_of_the_truth(world: SyntheticStream) -> None:
    score = world.best_auc()
    assert 0.65 < score <= 1.0
    rows = world.truth()
    assert best_auc(rows) == pytest.approx(score)
    assert world.best_auc(rows) == pytest.approx(score)
    # Labeled-like examples from the join work the same way
    examples = [
        SimpleNamespace(impression_id=r.impression_id, item_id=r.item_id, label=r.label)
        for r in rows
    ]
    assert world.best_auc(examples[:500]) == pytest.approx(best_auc(rows[:500]))


def test_auc_matches_the_pairwise_definition() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=60).astype(float)  # many ties
    labels = rng.integers(0, 2, size=60)
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairs = [(p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg)]
    assert auc(scores, labels) == pytest.approx(np.mean(pairs))
    assert auc([0.1, 0.9], [0, 1]) == 1.0 and auc([0.9, 0.1], [0, 1]) == 0.0
    assert np.isnan(auc([0.3, 0.4], [1, 1]))


def test_item_text_carries_the_topics(world: SyntheticStream) -> None:
    vocab = [set(v) for v in world.vocabulary]
    assert sum(len(v) for v in vocab) == len(set().union(*vocab)), "topic vocabularies overlap"
    share = []  # of each item's words, the share drawn from its dominant topic
    for i, text in enumerate(world.item_texts):
        topic = int(world.item_topics[i].argmax())
        words = text.split()
        assert len(words) == SMALL.words_per_item
        share.append(sum(w in vocab[topic] for w in words) / len(words))
        assert world.item_categories[i] == [world.topic_names[topic]]
    # words follow the topic mixture: on average the dominant topic's weight
    assert np.mean(share) == pytest.approx(
        world.item_topics.max(axis=1).mean(), abs=0.06
    )  # 4 sigma


def test_more_topics_than_built_in_themes() -> None:
    many = SyntheticStream(
        SyntheticConfig(users=10, items=20, new_items=0, events=50, topics=len(THEMES) + 3)
    )
    assert len(many.topic_names) == len(set(many.topic_names)) == len(THEMES) + 3
    assert all(len(v) == SyntheticConfig().words_per_topic for v in many.vocabulary)


@pytest.mark.parametrize(
    ("change", "setting"),
    [
        ({"users": 0}, "users"),
        ({"slate_size": 61}, "slate_size"),
        ({"shift_at": 1.5}, "shift_at"),
        ({"shift_fraction": -0.1}, "shift_fraction"),
        ({"click_delay_ms": (10, 5)}, "click_delay_ms"),
        ({"user_concentration": 0.0}, "user_concentration"),
    ],
)
def test_invalid_configs_are_config_errors(change: dict, setting: str) -> None:
    with pytest.raises(ConfigError) as err:
        SyntheticConfig(**{**SMALL.__dict__, **change})
    assert err.value.setting == setting


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    users=st.integers(1, 8),
    items=st.integers(3, 12),
    new_items=st.integers(0, 6),
    events=st.integers(0, 40),
    slate=st.integers(1, 3),
    shift_at=st.one_of(st.none(), st.floats(0, 1)),
    gap=st.sampled_from([0.0, 1.0, 500.0]),
    seed=st.integers(0, 2**16),
)
def test_invariants_hold_for_any_small_world(
    users, items, new_items, events, slate, shift_at, gap, seed
) -> None:
    config = SyntheticConfig(
        users=users,
        items=items,
        new_items=new_items,
        events=events,
        slate_size=slate,
        shift_at=shift_at,
        mean_gap_ms=gap,
        seed=seed,
        click_delay_ms=(0, 3),
    )
    world = SyntheticStream(config)
    _check_stream(world, list(world.stream()))


def test_cli_dry_run(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        cli.main(["synthetic", "--dry-run", "--users", "10", "--items", "20", "--events", "100"])
        == 0
    )
    out = capsys.readouterr().out
    assert "impressions" in out and "100" in out
    assert cli.main(["synthetic", "--dry-run", "--shift-fraction", "2"]) == 2
    assert "shift_fraction" in capsys.readouterr().err
