"""Labeled streams for offline learning: the synthetic world and MovieLens-100k, joined without Kafka."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from contract.records import Click, Impression, Item, Labeled, example_id
from harness.baselines import KnownGenerator


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


def labeled_examples(
    impressions: Sequence[Impression], clicks: Sequence[Click], *, window_ms: int, history_length: int
) -> list[Labeled]:
    """Labeled examples of a whole stream: the streams engineer's batch reference join when present.

    Fallback (same rules, simplified): each shown item is a positive if the
    user clicked it within ``window_ms`` of the impression (a later click is a
    negative then a late positive), else a negative; the history is the user's
    clicked items before the impression time.
    """
    try:
        from streams.join import reference_join
    except ImportError:  # the join module is part of the project; this keeps evaluate standalone
        reference_join = None
    if reference_join is not None:
        ref = reference_join(impressions, clicks, window_ms=window_ms, history_length=history_length)
        # the join's light example objects -> the Labeled records the trainer consumes
        examples = [e if isinstance(e, Labeled) else e.to_record() for e in ref.examples]
    else:
        examples = _local_join(impressions, clicks, window_ms=window_ms, history_length=history_length)
    order = {imp.impression_id: n for n, imp in enumerate(impressions)}
    examples.sort(key=lambda e: (e.impression_ts, order.get(e.impression_id, 0), e.position, e.late))
    return examples


def _local_join(
    impressions: Sequence[Impression], clicks: Sequence[Click], *, window_ms: int, history_length: int
) -> list[Labeled]:
    first: dict[str, Impression] = {}
    for imp in impressions:
        first.setdefault(imp.impression_id, imp)
    clicked: dict[tuple[str, str], Click] = {}
    for c in clicks:
        imp = first.get(c.impression_id)
        if imp is None or c.user_id != imp.user_id or c.item_id not in imp.items:
            continue
        key = (c.impression_id, c.item_id)
        if key not in clicked or c.ts < clicked[key].ts:
            clicked[key] = c
    by_user: dict[str, list[tuple[int, str, str]]] = {}
    for (iid, item), c in clicked.items():
        by_user.setdefault(c.user_id, []).append((c.ts, item, iid))
    for v in by_user.values():
        v.sort()
    out: list[Labeled] = []
    for imp in first.values():
        hist = [i for ts, i, iid in by_user.get(imp.user_id, []) if ts < imp.ts and iid != imp.impression_id]
        hist = hist[-history_length:]
        end = imp.ts + window_ms
        for pos, item in enumerate(imp.items):
            c = clicked.get((imp.impression_id, item))
            common = dict(
                example_id=example_id(imp.impression_id, item), impression_id=imp.impression_id,
                user_id=imp.user_id, item_id=item, position=pos, history=hist, impression_ts=imp.ts,
            )
            if c is not None and c.ts <= end:
                out.append(Labeled(label=1, value=c.value, label_ts=c.ts, ts=c.ts, **common))
                continue
            out.append(Labeled(label=0, label_ts=end, ts=end, **common))
            if c is not None:
                out.append(Labeled(label=1, value=c.value, label_ts=c.ts, ts=c.ts, late=True, **common))
    return out


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
        generator=KnownGenerator(
            item_topics=dict(zip(world.item_ids, world.item_topics, strict=True)),
            sharpness=world.config.sharpness,
            bias=world.config.bias,
            user_concentration=world.config.user_concentration,
        ),
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
