"""Labeled streams for offline learning: the synthetic world and MovieLens-100k, joined without Kafka."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from contract.records import Click, Impression, Item, Labeled
from harness.baselines import KnownGenerator
from streams.join import reference_join


@dataclass
class Replay:
    """A labeled stream ready for offline learning."""

    name: str
    items: list[Item]
    examples: list[Labeled]
    """In event-time order (impression time, then slate position)."""
    truth: Callable[[Sequence[Labeled]], float] | None = None
    """Best achievable AUC on some examples (synthetic only)."""
    shift_ts: int | None = None
    notes: dict[str, float] = field(default_factory=dict)
    generator: KnownGenerator | None = None
    """What the learnable oracle may know of the generator (synthetic only)."""
    stable_users: frozenset[str] | None = None
    """Users whose interests do not change during the stream (synthetic only: all but the shifted
    ones): forgetting is also measured on their held-out examples, whose labels stay true."""


def labeled_examples(
    impressions: Sequence[Impression], clicks: Sequence[Click], *, window_ms: int, history_length: int
) -> list[Labeled]:
    """Labeled examples of a whole stream: the streams batch reference join
    (:func:`streams.join.reference_join`), as the records the trainer consumes,
    in event-time order (impression time, then stream order, slate position,
    the negative before a late positive)."""
    ref = reference_join(impressions, clicks, window_ms=window_ms, history_length=history_length)
    examples = [e.to_record() for e in ref.examples]
    order = {imp.impression_id: n for n, imp in enumerate(impressions)}
    examples.sort(key=lambda e: (e.impression_ts, order.get(e.impression_id, 0), e.position, e.late))
    return examples


def _split(events) -> tuple[list[Item], list[Impression], list[Click]]:  # noqa: ANN001
    items, imps, clicks = [], [], []
    for _spec, rec in events:
        if isinstance(rec, Item):
            items.append(rec)
        elif isinstance(rec, Impression):
            imps.append(rec)
        elif isinstance(rec, Click):
            clicks.append(rec)
    return items, imps, clicks


def load_synthetic(
    *, events: int, seed: int, history_length: int, users: int = 200, shift_fraction: float = 0.5
) -> Replay:
    from streams.replay.synthetic import SyntheticConfig, SyntheticStream

    world = SyntheticStream(
        SyntheticConfig(events=events, users=users, shift_fraction=shift_fraction, seed=seed)
    )
    items, imps, clicks = _split(world.stream())
    examples = labeled_examples(imps, clicks, window_ms=3_600_000, history_length=history_length)
    return Replay(
        name="synthetic",
        items=sorted(items, key=lambda i: i.ts),
        examples=examples,
        truth=lambda exs: world.best_auc(list(exs)),
        shift_ts=world.shift_ts,
        generator=KnownGenerator.of(world),
        stable_users=frozenset(world.user_ids) - {world.user_ids[u] for u in world.shifted_users},
    )


def load_movielens(*, limit: int | None, slate_size: int, seed: int, history_length: int) -> Replay:
    """MovieLens-100k; ``limit`` ratings (impressions) in event-time order, 0 or None = all 100k."""
    from infra.assets import movielens_path
    from streams.replay.movielens import MovieLensReplay, MovieLensReplayConfig

    replay = MovieLensReplay.from_path(
        movielens_path(), MovieLensReplayConfig(limit=limit or None, slate_size=slate_size, seed=seed)
    )
    items, imps, clicks = _split(replay.stream())
    examples = labeled_examples(imps, clicks, window_ms=3_600_000, history_length=history_length)
    return Replay(name="movielens", items=sorted(items, key=lambda i: i.ts), examples=examples)
