"""The impression–click join of DESIGN.md as a pure state machine: no Faust, no Kafka.

One :class:`JoinCore` owns one partition.  Feed it impressions and clicks in
arrival order (:meth:`JoinCore.on_impression`, :meth:`JoinCore.on_click`) and
call :meth:`JoinCore.tick` now and then; each call returns what to emit:
:class:`Example` (a ``labeled`` record), :class:`HistoryUpdate` (a ``user-history``
record) and :class:`Rejected` clicks (for the dead-letter topic).  Examples
and history updates are light objects with the record's field names; they
encode straight to the record's JSON (``to_json``, no validation pass: every
field is correct by construction) or convert to the validated record
(``to_record``).

Semantics (all times are event time in ms unless they say wall clock):

* **Watermarks.**  Each input stream has ``max ts seen − allowed_lateness``;
  the partition watermark is the minimum of the two and never goes back.  A
  stream with no arrival for ``idle_timeout_s`` (wall clock, injectable
  ``clock``) stops holding it back.
* **One bad clock cannot move the watermark.**  An event counts towards its
  stream's ``max ts`` with ``min(ts, Kafka timestamp)`` (the worker passes each
  record's timestamp as ``kafka_ts``): an event up to the skew bound
  (``check_event_time``) ahead of its Kafka timestamp still joins, but the
  watermark never runs ahead of the arrival times seen.  Without a Kafka
  timestamp (``kafka_ts=None``) the event time counts as it is.
* **Idle closing follows the time that passed.**  When both streams are idle
  the watermark becomes the event time *inferred from arrival*: the newest
  Kafka timestamp seen (else the newest event time) plus the wall time passed
  since, minus the allowed lateness.  A quiet live partition therefore keeps
  its 30-minute windows open for 30 minutes, while a replay of old data (its
  event times far behind its Kafka timestamps) still closes at once.  Early
  clicks become orphans by the same watermark (``click ts + grace``), no longer
  all at once.  **Redo rule:** before each event, what idle ticks could have
  done since the previous one is redone from the Kafka timestamps alone: a
  stream whose newest Kafka timestamp is ``idle_timeout_s`` or more before the
  event's counts as idle (both: the watermark may reach ``event's Kafka
  timestamp − lateness``).  Idle ticks never run ahead of the records appended
  after them, so replaying the same inputs from a restored state (a redo after
  a crash) emits the same label and ``late`` flag per example_id.  Limits: a
  stream this partition has never seen is idle by the wall clock only, and
  Kafka timestamps are taken as arrival times (CreateTime at produce, or
  LogAppendTime); a producer stamping records far from its send time defeats it.
* **Window.**  An impression at ``T`` attributes clicks with ``ts <= T + window``:
  the window end is **inclusive**.  The window closes when the watermark
  passes the end (``watermark > T + window``); every shown item not clicked
  by then is emitted with ``label=0`` and ``label_ts = T + window``.
* **Positives** are emitted when the click arrives (``label_ts`` = click ts).
  A click after the window end, or one that arrives after the window closed,
  becomes a positive with ``late=True``, always after the item's negative.
* **Early clicks** (impression not seen yet) wait until the watermark passes
  ``click ts + orphan_grace_ms`` (or the buffer of ``orphan_buffer_max`` is
  full, oldest first), then become orphans.  A click that contradicts its
  impression (item not in the slate, other user) is rejected at once.
* **Duplicates.**  At most one negative and one positive per ``example_id``;
  a repeated impression id or click changes nothing.  A closed impression is
  remembered until the watermark passes ``max(T + window, watermark at its
  close) + closed_retention_ms`` and among the newest ``closed_max`` closed
  ones; after that a click for it is an orphan and a replayed impression would
  be joined afresh.  So an impression that arrives far behind the watermark (a
  backfill into a running app) closes at once with its negatives, and the
  clicks that follow it are late positives, not orphans.  Such events (more
  than a window behind the watermark) are counted in ``counts``
  (``behind_watermark_impressions`` / ``_clicks``); the worker logs and
  exports them (``streamrec_join_behind_watermark_total``).
* **History.**  Every accepted click (the first one per example_id) goes into
  the user's history.  An example carries the user's last ``history_length``
  clicked items with ``ts < T`` (strictly before the impression, never a click
  of the same impression): no click after the impression can leak in.
  Negatives see every such click that arrived within the lateness; a positive
  sees those that arrived before it.  A history keeps every entry newer than
  ``watermark − window − retention`` (still needed for open or remembered
  impressions) plus the ``history_length`` entries before that, and never
  more than ``max(4 × history_length, history_length + 100)``.

:func:`reference_join` (:mod:`streams.join.reference`) computes the same labels
from the whole stream at once;
for any arrival order within the allowed lateness (clicks no earlier than
their impression minus the grace, no later than window + retention after it)
the core emits the same set of ``(example_id, label)``.

State for persistence: :meth:`JoinCore.drain_changes` returns the state keys
changed since the last call (JSON-able values, ``None`` = deleted) and
:meth:`JoinCore.restore` rebuilds a core from such keys.  The state also
records, per input stream, the next offset it must apply
(:meth:`JoinCore.next_offset`), so a worker that restores it skips redelivered
inputs instead of applying them to a state that has moved past them, and
re-reads any it never got (:mod:`streams.offsets`).

Modules: :mod:`~streams.join.config` (the semantics' settings),
:mod:`~streams.join.core` (the state machine), :mod:`~streams.join.early` (the
early-click buffer, O(1) per click), :mod:`~streams.join.state` (restoring
state keys), :mod:`~streams.join.history`
(the users' click histories), :mod:`~streams.join.outputs` (what it emits),
:mod:`~streams.join.wire` (its hand-written JSON and the persisted state keys),
:mod:`~streams.join.reference` (the batch reference).  Everything public is
importable from ``streams.join``.
"""


from streams.join.config import NO_WATERMARK, JoinConfig, check_event_time
from streams.join.core import JoinCore
from streams.join.outputs import Example, HistoryUpdate, Output, Rejected
from streams.join.reference import ReferenceJoin, reference_join
from streams.join.wire import json_list

__all__ = [
    "NO_WATERMARK",
    "Example",
    "HistoryUpdate",
    "JoinConfig",
    "JoinCore",
    "Output",
    "ReferenceJoin",
    "Rejected",
    "check_event_time",
    "json_list",
    "reference_join",
]
