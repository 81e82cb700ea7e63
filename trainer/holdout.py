"""The guardrail's statistics: the held-back examples, the popularity fallback, the live copy.

A deterministic ``holdout_fraction`` of example_ids (:func:`held_back`, a
hash: the same examples across restarts) is kept out of training; the most
recent ``holdout_size`` of them are what a candidate version is judged on
before it is published.  With no live version the candidate must beat the
popularity fallback (:func:`~trainer.guardrail.beats_fallback`), fed by the
positives trained on as serving computes it; with one, it must be no worse
than the live version (:func:`~trainer.guardrail.guardrail_passes`).  The
rules are in :mod:`trainer.guardrail`; this module gathers their inputs.
"""

from __future__ import annotations

import hashlib
import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from contract.errors import RecordError
from contract.records import Labeled
from trainer.dedupe import dedupe_key
from trainer.guardrail import Refusal, beats_fallback, guardrail_passes
from trainer.learner import ContinualLearner
from trainer.metrics import binary_metrics, finite, paired_log_loss_se
from trainer.model import RecModel
from trainer.popularity import Popularity
from trainer.service_settings import TrainerSettings
from trainer.weights import WeightsError, WeightStore

log = logging.getLogger(__name__)


def held_back(example_id: str, fraction: float, seed: int = 0) -> bool:
    """Whether an example is held back from training for the guardrail (stable across restarts)."""
    if fraction <= 0.0:
        return False
    digest = hashlib.blake2b(f"{seed}:{example_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64 < fraction


@dataclass
class Verdict:
    """What the guardrail said of a candidate: publish or not, why, and what goes in the manifest."""

    ok: bool
    metrics: dict[str, float] = field(default_factory=dict)
    candidate: dict[str, float] = field(default_factory=dict)
    """The candidate's predictions by example key (the live version's once it is published)."""
    refusal: Refusal | None = None
    why: str = ""


class Holdout:
    """The held-back examples, the popularity fallback and the live version's copy, with their state."""

    def __init__(self, settings: TrainerSettings) -> None:
        self.settings = settings
        self.examples: deque[Labeled] = deque(maxlen=settings.holdout_size)
        self.popularity = Popularity(settings.fallback_half_life_s)
        """The popularity fallback as serving computes it, fed by the positives trained on."""
        self.live_model: RecModel | None = None
        self.live_version: int | None = None
        self._live_probs: dict[str, float] = {}

    # --- feeding ------------------------------------------------------------------------
    def split(self, examples: Iterable[Labeled]) -> tuple[list[Labeled], list[Labeled]]:
        """(to train on, held back); the held-back ones are kept for the guardrail."""
        s = self.settings
        train: list[Labeled] = []
        held: list[Labeled] = []
        for ex in examples:
            (held if held_back(ex.example_id, s.holdout_fraction, s.seed) else train).append(ex)
        self.examples.extend(held)
        return train, held

    def trained(self, examples: Iterable[Labeled]) -> None:
        """Examples trained on: serving's fallback counts each click once (a late one too)."""
        for ex in examples:
            if ex.label == 1:
                self.popularity.add((ex.item_id,), ex.label_ts)

    # --- the live version ---------------------------------------------------------------
    def promote(self, version: int, verdict: Verdict, model: RecModel, store: WeightStore, device: str) -> None:
        """The candidate is the live version now: copy it (loaded once from the store, then copied in)."""
        if self.live_model is None:
            self._load_live(store, version, device, model)
        else:
            self.live_model.load_state_dict(model.state_dict())
        assert self.live_model is not None
        self.live_model.eval()
        self.live_version = version
        self._live_probs = verdict.candidate

    def _load_live(self, store: WeightStore, version: int, device: str, model: RecModel) -> None:
        self.live_model = store.load(version, device=device)
        if model.prefix_cache is not None:  # same frozen prefix: share its cached states
            self.live_model.attach_cache(model.prefix_cache)

    # --- judging --------------------------------------------------------------------------
    def judge(self, learner: ContinualLearner) -> Verdict:
        """The guardrail's verdict on the learner's model (the fallback's held-back AUC is computed,
        and goes in the manifest, either way)."""
        s = self.settings
        if s.holdout_fraction <= 0:
            return Verdict(True)
        holdout = list(self.examples)
        if len(holdout) < s.guardrail_min_examples:
            log.info("publish postponed: %d held-back examples, the guardrail needs %d",
                     len(holdout), s.guardrail_min_examples)
            return Verdict(False)
        cand_probs, kept = learner.predict(holdout)
        cand = {dedupe_key(holdout[i]): float(p) for i, p in zip(kept, cand_probs, strict=True)}
        by_key = {dedupe_key(ex): ex for ex in holdout}
        keys = list(cand)
        y = [by_key[k].label for k in keys]
        fallback = self.popularity.vector([by_key[k].item_id for k in keys])
        fb_ok, fb_refusal, fb_why, extra = beats_fallback(
            y, [cand[k] for k in keys], fallback, z=s.guardrail_fallback_z)
        extra["holdout_examples"] = float(len(keys))
        if self.live_model is None:
            if not fb_ok:
                why = f"against the popularity fallback on {len(keys)} held-back examples: {fb_why}"
                return Verdict(False, extra, cand, fb_refusal, why)
            log.info("guardrail passed against the popularity fallback on %d held-back examples: %s",
                     len(keys), fb_why)
            return Verdict(True, extra, cand)
        # The live version does not change between publishes: score each held-back example once.
        new = [ex for ex in holdout if dedupe_key(ex) in cand and dedupe_key(ex) not in self._live_probs]
        if new:
            live_probs, live_kept = learner.predict(new, self.live_model)
            for i, p in zip(live_kept, live_probs, strict=True):
                self._live_probs[dedupe_key(new[i])] = float(p)
        # Examples that left the held-back window (at most holdout_size are kept) leave the cache too,
        # or it would grow without bound while candidates are refused.
        self._live_probs = {k: p for k, p in self._live_probs.items() if k in by_key}
        keys = [k for k in cand if k in self._live_probs]
        y = [by_key[k].label for k in keys]
        pc, pl = [cand[k] for k in keys], [self._live_probs[k] for k in keys]
        cand_m, live_m = binary_metrics(y, pc), binary_metrics(y, pl)
        ok, reason, why = guardrail_passes(
            cand_m, live_m, metric=s.guardrail_metric, margin=s.guardrail_margin,
            z=s.guardrail_z, loss_diff_se=paired_log_loss_se(y, pc, pl),
        )
        extra.update({f"holdout_{k}": float(v) for k, v in cand_m.items() if finite(v)})
        extra.update({f"live_holdout_{k}": float(v) for k, v in live_m.items() if finite(v)})
        if not ok:
            return Verdict(False, extra, cand, reason, f"against live version {self.live_version}: {why}")
        log.info("guardrail passed against live version %s on %d held-back examples: %s "
                 "(vs the popularity fallback: %s)", self.live_version, len(keys), why, fb_why)
        return Verdict(True, extra, cand)

    # --- checkpoint -------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "live_version": self.live_version,
            "holdout": [ex.to_dict() for ex in self.examples],
            "popularity": self.popularity.state(),
        }

    def restore(self, state: dict[str, Any], store: WeightStore, device: str, model: RecModel) -> None:
        """Resume from :meth:`state`: the held-back examples, the fallback, the live version's copy."""
        for d in state.get("holdout", []):
            try:
                self.examples.append(Labeled.from_dict(d))
            except RecordError as exc:
                log.warning("dropping a held-back example from the checkpoint: %s", exc)
        if isinstance(state.get("popularity"), dict):
            self.popularity = Popularity.from_state(state["popularity"], self.settings.fallback_half_life_s)
        live = state.get("live_version")
        if live is not None:
            try:
                self._load_live(store, int(live), device, model)
                self.live_version = int(live)  # the teacher came back with the learner state
            except WeightsError as exc:
                log.warning("live version %s cannot be loaded (%s); the next publish has no guardrail",
                            live, exc)
