"""The guardrail's statistics: the held-back examples, the popularity fallback, the live copy.

A deterministic ``holdout_fraction`` of example_ids (:func:`held_back`, a
hash: the same examples across restarts) is kept out of training; the most
recent ``holdout_size`` of them are what a candidate version is judged on
before it is published.  With no live version the candidate must beat the
popularity fallback (:func:`~trainer.guardrail.beats_fallback`), fed by the
positives trained on as serving computes it; with one, it must be no worse
than the live version (:func:`~trainer.guardrail.guardrail_passes`).  The
rules are in :mod:`trainer.guardrail`; this module gathers their inputs.

With ``ope_gate`` (``report`` or ``on``) it also keeps the most recent
``ope_holdout_size`` held-back *exploration* examples (position 0, with a
propensity, not late) and estimates, by off-policy evaluation
(:mod:`trainer.ope`, IPS/SNIPS/DR with impression-clustered standard errors),
the click rate of each version's **top-1 policy**: for each such example's
context (user and history; contexts without a known history item are left
out, serving answers those by its cold-start blend) the item the version
scores highest over the whole catalog, as serving ranks it without
candidates.  Position 0 only, because serving's propensities further down are
conditional on the items above and the held-back examples are a per-item
sample, so slate prefixes are incomplete.  The estimates go in the manifest
(``ope_<estimator>``, ``live_ope_<estimator>``, ``ope_<estimator>_diff`` and
``_se``); with ``on`` a candidate whose estimate is worse than the live
version's by more than the margin plus ``ope_z`` paired standard errors is
refused (:func:`~trainer.guardrail.ope_passes`).  DR's reward model is the
live version's predictions (the candidate's own before there is one).  Cost:
each judged version's item vectors over the whole catalog, once per attempt.
"""

from __future__ import annotations

import hashlib
import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from contract.errors import RecordError
from contract.records import Labeled
from trainer import ope
from trainer.catalog import Catalog
from trainer.dedupe import dedupe_key
from trainer.guardrail import Refusal, beats_fallback, guardrail_passes, ope_passes
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
        self.ope_examples: deque[Labeled] = deque(maxlen=settings.ope_holdout_size)
        """Held-back exploration examples at position 0 (with a propensity) for the OPE gate."""

    # --- feeding ------------------------------------------------------------------------
    def split(self, examples: Iterable[Labeled]) -> tuple[list[Labeled], list[Labeled]]:
        """(to train on, held back); the held-back ones are kept for the guardrail."""
        s = self.settings
        train: list[Labeled] = []
        held: list[Labeled] = []
        for ex in examples:
            (held if held_back(ex.example_id, s.holdout_fraction, s.seed) else train).append(ex)
        self.examples.extend(held)
        if s.ope_gate != "off":
            self.ope_examples.extend(ex for ex in held if _explored(ex))
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
        ope_metrics, ope_verdict = self._ope(learner)
        extra.update(ope_metrics)
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
        if ope_verdict is not None:
            ope_ok, ope_refusal, ope_why = ope_verdict
            if not ope_ok and s.ope_gate == "on":
                return Verdict(False, extra, cand, ope_refusal,
                               f"against live version {self.live_version} by off-policy evaluation: {ope_why}")
            log.info("OPE (%s) against live version %s: %s", s.ope_gate, self.live_version, ope_why)
        log.info("guardrail passed against live version %s on %d held-back examples: %s "
                 "(vs the popularity fallback: %s)", self.live_version, len(keys), why, fb_why)
        return Verdict(True, extra, cand)

    # --- off-policy evaluation -----------------------------------------------------------------
    def _ope(self, learner: ContinualLearner) -> tuple[dict[str, float], tuple[bool, Refusal | None, str] | None]:
        """The OPE estimates of the candidate (and the live version) for the manifest, and the
        gate's (passes, refusal, why) when there is a live version to compare with."""
        s = self.settings
        if s.ope_gate == "off" or not self.ope_examples:
            return {}, None
        logged, rows = ope.from_labeled(self.ope_examples, k=1)
        if not rows:
            return {}, None
        max_history = learner.model.config.max_history
        cand_top, cand_q = catalog_top1(learner.model, learner.catalog, rows, max_history=max_history,
                                        device=learner.device, ask=[[r.item_id] for r in rows])
        valid = np.array([t is not None for t in cand_top], dtype=bool)
        live = self.live_model
        if live is not None:
            live_top, live_q = catalog_top1(
                live, learner.catalog, rows, max_history=max_history, device=learner.device,
                ask=[[r.item_id] + ([c] if c is not None else []) for r, c in zip(rows, cand_top, strict=True)])
            valid &= np.array([t is not None for t in live_top], dtype=bool)
        n = int(valid.sum())
        out = {"ope_examples": float(n)}
        if n == 0:
            return out, None
        idx = np.flatnonzero(valid)
        logged = logged.subset(idx)
        items = [rows[i].item_id for i in idx]
        rm = live_q if live is not None else cand_q  # DR's reward model: the live version's predictions
        c_top = [cand_top[i] for i in idx]
        cand_t = ope.deterministic(items, c_top, [rm[i][rows[i].item_id] for i in idx],
                                   [rm[i][cand_top[i]] for i in idx])
        out["ope_matched"] = float(int(cand_t.prob.sum()))
        clip = s.ope_clip or None
        if live is None:
            for kind in ope.KINDS:
                out.update(ope.estimate(kind, logged, cand_t, clip=clip).metrics(f"ope_{kind}"))
            return out, None
        live_t = ope.deterministic(items, [live_top[i] for i in idx], [rm[i][rows[i].item_id] for i in idx],
                                   [rm[i][live_top[i]] for i in idx])
        verdict = None
        for kind in ope.KINDS:
            a, b, d = ope.paired(kind, logged, cand_t, live_t, clip=clip)
            out.update({k: v for k, v in a.metrics(f"ope_{kind}").items() if not k.endswith(("_lower", "_upper"))})
            out.update({k: v for k, v in b.metrics(f"live_ope_{kind}").items() if not k.endswith(("_lower", "_upper"))})
            out.update({k: v for k, v in d.metrics(f"ope_{kind}_diff").items() if not k.endswith("_matched")})
            if kind == s.ope_estimator:
                verdict = ope_passes(d.value, d.se, estimator=kind, margin=s.ope_margin, z=s.ope_z,
                                     examples=n, min_examples=s.ope_min_examples)
        return out, verdict

    # --- checkpoint -------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "live_version": self.live_version,
            "holdout": [ex.to_dict() for ex in self.examples],
            "popularity": self.popularity.state(),
            "ope_holdout": [ex.to_dict() for ex in self.ope_examples],
        }

    def restore(self, state: dict[str, Any], store: WeightStore, device: str, model: RecModel) -> None:
        """Resume from :meth:`state`: the held-back examples, the fallback, the live version's copy."""
        for d in state.get("holdout", []):
            try:
                self.examples.append(Labeled.from_dict(d))
            except RecordError as exc:
                log.warning("dropping a held-back example from the checkpoint: %s", exc)
        for d in state.get("ope_holdout", []):
            try:
                self.ope_examples.append(Labeled.from_dict(d))
            except RecordError as exc:
                log.warning("dropping a held-back exploration example from the checkpoint: %s", exc)
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


def _explored(ex: Labeled) -> bool:
    """An example the OPE gate can use: logged at position 0 with a propensity, in its window."""
    return ex.propensity is not None and ex.position == 0 and not ex.late


@torch.no_grad()
def catalog_top1(
    model: RecModel, catalog: Catalog, contexts: list[Labeled], *, max_history: int,
    device: torch.device | str, ask: list[list[str]] | None = None, chunk: int = 256,
) -> tuple[list[str | None], list[dict[str, float]]]:
    """Each context's top-1 item over the whole catalog under ``model`` (ties: the smaller item_id;
    serving breaks exact ties by a hash of the request_id, which a logged example does not carry,
    and a model's scores rarely tie), and the click probabilities of its ``ask`` items (and of the top-1).

    A context is an example's (user, history); one without a known history item gets None (serving
    answers such a user by its cold-start blend, not by the model's ranking).  Uses the model's
    serving API only (``encode_items``, ``encode_users_indexed``, ``score_matrix``), in eval mode.
    """
    entries = catalog.entries()
    ids = sorted(entries)
    index = {i: n for n, i in enumerate(ids)}
    tops: list[str | None] = [None] * len(contexts)
    probs: list[dict[str, float]] = [{} for _ in contexts]
    if not ids or not contexts:
        return tops, probs
    was_training = model.training
    model.eval()
    try:
        order = sorted(range(len(ids)), key=lambda r: len(entries[ids[r]].text))  # little padding
        parts = []
        for start in range(0, len(order), chunk):
            rows = [ids[r] for r in order[start : start + chunk]]
            parts.append(model.encode_items([entries[i].text for i in rows], rows,
                                            [entries[i].text_hash for i in rows],
                                            [entries[i].categories for i in rows]).float())
        got = torch.cat(parts)
        vecs = torch.empty_like(got)
        vecs[torch.tensor(order, device=got.device)] = got
        hists = [[index[h] for h in ex.history if h in index][-max_history:] if max_history > 0 else []
                 for ex in contexts]
        live = [c for c, h in enumerate(hists) if h]
        for start in range(0, len(live), 64):
            cs = live[start : start + 64]
            width = max(len(hists[c]) for c in cs)
            hist = torch.zeros((len(cs), width), dtype=torch.long)
            mask = torch.zeros((len(cs), width), dtype=torch.bool)
            for r, c in enumerate(cs):
                hist[r, : len(hists[c])] = torch.tensor(hists[c])
                mask[r, : len(hists[c])] = True
            dev = vecs.device
            users = model.encode_users_indexed(vecs, hist.to(dev), mask.to(dev), [contexts[c].user_id for c in cs])
            p = torch.sigmoid(model.score_matrix(users.float(), vecs).float()).cpu().numpy()
            best = p.argmax(axis=1)  # the first maximum: the smaller item_id among ties
            for r, c in enumerate(cs):
                tops[c] = ids[int(best[r])]
                want = set(ask[c]) if ask is not None else set()
                want.add(tops[c])
                probs[c] = {i: float(p[r, index[i]]) for i in want if i in index}
    finally:
        model.train(was_training)
    return tops, probs
