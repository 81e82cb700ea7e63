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
  the partition watermark is the minimum of the two and never goes back.  An
  event moves its stream's max at most ``watermark_lead_ms`` past the wall
  clock (injectable ``wall``), so one clock ahead cannot close the partition.
  A stream with no arrival for ``idle_timeout_s`` (wall clock, injectable
  ``clock``) holds it back only to its newest ts advanced at the wall-clock
  rate since (one never seen not at all); when both are idle, the windows (and early
  clicks' grace) that ended before the later of (newest ts + idle time) and the
  wall clock close, without moving the watermark: a quiet live partition keeps
  its window, a finished replay of the past closes at once.
* **Behind the watermark.**  An impression whose window ended before the
  watermark on arrival (a backfill) closes at once (its clicks are late
  positives).  A closed impression is forgotten once its event-time retention
  has passed and ``late_hold_events`` more events have arrived; an early click
  already past its grace on arrival waits as many arrivals for its impression.
* **Window.**  An impression at ``T`` attributes clicks with ``ts <= T + window``:
  the window end is **inclusive**.  The window closes when the watermark
  passes the end (``watermark > T + window``); every shown item not clicked
  by then is emitted with ``label=0`` and ``label_ts = T + window``.
* **Positives** (``label_ts`` = click ts) are emitted with their impression's negatives when its
  window closes, after them (``positives_at_close``, the default: held in the impression's
  persisted state), or when the click arrives (``positives_at_close=False``); the click's
  ``user-history`` update goes out when it arrives either way.
  A click after the window end, or one that arrives after the window closed,
  becomes a positive with ``late=True``, always after the item's negative.
* **Early clicks** (impression not seen yet) wait until the watermark passes
  ``click ts + orphan_grace_ms`` (or the buffer of ``orphan_buffer_max`` is
  full, oldest first, or the impression has ``early_per_impression_max``),
  then become orphans; O(1) per click.  A click that contradicts its
  impression (item not in the slate, other user) is rejected at once.
* **Duplicates.**  At most one negative and one positive per ``example_id``;
  a repeated impression id or click changes nothing.  Closed impressions are
  remembered until the watermark passes ``T + window + closed_retention_ms``
  and ``late_hold_events`` more events arrived (bounded by event time and count); after that a click for
  them is an orphan and a replayed impression would be joined afresh.
* **History.**  Every accepted click (the first one per example_id) goes into
  the user's history.  An example carries the user's last ``history_length``
  clicked items with ``ts < T`` (strictly before the impression, never a click
  of the same impression): no click after the impression can leak in.
  Negatives see every such click that arrived within the lateness, and so does
  a positive emitted at the close; one emitted on its click sees those that
  arrived before it.  A history keeps every entry newer than
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
:mod:`~streams.join.core` (the state machine), :mod:`~streams.join.history`
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
