"""The batch reference of the join: the labels of a whole stream computed at once.

For any arrival order within the allowed lateness (clicks no earlier than
their impression minus the grace, no later than window + retention after it)
:class:`streams.join.JoinCore` emits the same set of ``(example_id, label)``
as :func:`reference_join`; the property tests and the worker's integration
tests check exactly that, and the offline evaluation
(:func:`harness.replays.labeled_examples`) labels its replays with it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from contract.records import Click, Impression
from streams.join.outputs import Example


@dataclass(frozen=True)
class ReferenceJoin:
    """What the join must emit for a whole stream, computed at once (see :func:`reference_join`)."""

    examples: tuple[Example, ...]
    orphans: tuple[Click, ...]
    invalid: tuple[Click, ...]

    def pairs(self) -> set[tuple[str, int]]:
        """The emitted set: ``(example_id, label)``."""
        return {(e.example_id, e.label) for e in self.examples}

    def positives(self) -> set[str]:
        return {e.example_id for e in self.examples if e.label == 1}

    def negatives(self) -> set[str]:
        return {e.example_id for e in self.examples if e.label == 0}


def reference_join(
    impressions: Iterable[Impression],
    clicks: Iterable[Click],
    *,
    window_ms: int,
    history_length: int = 50,
) -> ReferenceJoin:
    """The labels of DESIGN.md from the whole stream at once (no watermarks, no arrival order).

    * The first impression of each id counts; a click whose impression id is
      never seen is an orphan; one on another user or an item outside the slate
      is invalid.
    * Per (impression, item): clicked at ``ts <= impression ts + window`` →
      one positive (``label_ts`` = the earliest such click); clicked only later
      → a negative at the window end and a late positive; never → a negative.
    * History as of the impression: the user's last ``history_length`` clicked
      items (the earliest accepted click per example, by ts) with
      ``ts < impression ts``, excluding the impression's own clicks.
    """
    first: dict[str, tuple[int, Impression]] = {}
    for order, imp in enumerate(impressions):
        first.setdefault(imp.impression_id, (order, imp))
    orphans: list[Click] = []
    invalid: list[Click] = []
    clicked: dict[tuple[str, str], Click] = {}  # earliest click per example, ties by stream order
    for click in clicks:
        found = first.get(click.impression_id)
        if found is None:
            orphans.append(click)
            continue
        imp = found[1]
        if click.user_id != imp.user_id or click.item_id not in imp.items:
            invalid.append(click)
            continue
        key = (click.impression_id, click.item_id)
        if key not in clicked or click.ts < clicked[key].ts:
            clicked[key] = click
    # history entries per user: (ts, impression order, item, impression id)
    by_user: dict[str, list[tuple[int, int, str, str]]] = {}
    for (iid, item), click in clicked.items():
        by_user.setdefault(click.user_id, []).append((click.ts, first[iid][0], item, iid))
    for entries in by_user.values():
        entries.sort()
    examples: list[Example] = []
    for _order, imp in sorted(first.values(), key=lambda p: p[0]):
        prior = [
            item
            for ts, _o, item, iid in by_user.get(imp.user_id, [])
            if ts < imp.ts and iid != imp.impression_id
        ]
        history = prior[-history_length:]
        end = imp.ts + window_ms
        iid, user = imp.impression_id, imp.user_id
        props, version = imp.propensities, imp.model_version
        for position, item in enumerate(imp.items):
            click = clicked.get((iid, item))
            p = None if props is None else props[position]
            if click is None or click.ts > end:
                examples.append(
                    Example(iid, user, item, position, 0, None, history, imp.ts, end, False, None, p, version)
                )
            if click is not None:
                late = click.ts > end
                examples.append(
                    Example(iid, user, item, position, 1, click.value, history, imp.ts, click.ts, late, None, p, version)
                )  # fmt: skip
    return ReferenceJoin(tuple(examples), tuple(orphans), tuple(invalid))
