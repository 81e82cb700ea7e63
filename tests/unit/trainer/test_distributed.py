"""The data-parallel pieces (trainer/distributed.py): who owns what, the checkpoint's world size, and
2-process gloo groups on localhost (torch.multiprocessing spawn): the lockstep round, the weighted
gradient average, learners that stay bit-identical, and a rank that dies."""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from contract.errors import ConfigError
from contract.records import Item, Labeled
from trainer.catalog import Catalog
from trainer.checkpoint import CheckpointError
from trainer.distributed import (
    PER_RANK_LEARNER_KEYS,
    Group,
    GroupError,
    RankInfo,
    attach,
    average_gradients,
    broadcast_model,
    check_world_size,
    merge_learner_state,
    owner,
    rank_from_env,
    rank_path,
    replica_digest,
    share,
    split_learner_state,
    sync_centring,
    synced_step,
)
from trainer.learner import ContinualLearner, LearnerConfig
from trainer.model import ModelConfig, build_model

CATEGORIES = ["comedy", "drama", "scifi"]


# --------------------------------------------------------------------------- without a group
def test_rank_from_env() -> None:
    assert rank_from_env({}) is None
    assert rank_from_env({"WORLD_SIZE": "1", "RANK": "0"}) is None  # a group of one is the single process
    info = rank_from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"})
    assert info == RankInfo(3, 4, 1) and not info.is_main
    assert rank_from_env({"WORLD_SIZE": "2", "RANK": "0"}) == RankInfo(0, 2, 0)
    with pytest.raises(ConfigError, match="WORLD_SIZE"):
        rank_from_env({"WORLD_SIZE": "two"})
    with pytest.raises(ConfigError, match="impossible"):
        rank_from_env({"WORLD_SIZE": "2", "RANK": "2"})


def test_static_partition_share() -> None:
    parts = [0, 1, 2, 3, 4]
    assert [owner(p, 2) for p in parts] == [0, 1, 0, 1, 0]
    assert share(parts, 0, 2) == [0, 2, 4] and share(parts, 1, 2) == [1, 3]
    assert share([0, 1], 2, 3) == []  # more ranks than partitions: a rank with none
    shares = [share(parts, r, 3) for r in range(3)]
    assert sorted(p for s in shares for p in s) == parts  # every partition once
    assert rank_path("/x/ids.log", 1) == "/x/ids.log.rank1"


def test_a_checkpoint_of_another_world_size_is_refused() -> None:
    check_world_size({}, 1, where="d")  # a single-process checkpoint, a single process
    check_world_size({"world_size": 2}, 2, where="d")
    with pytest.raises(CheckpointError, match="written by a single trainer process, and this is a group of 2"):
        check_world_size({}, 2, where="d")
    with pytest.raises(CheckpointError, match="group of 2 trainer ranks.*torchrun --nproc-per-node 2"):
        check_world_size({"world_size": 2}, 1, where="d")
    with pytest.raises(CheckpointError, match="group of 4 trainer ranks, and this is a group of 2"):
        check_world_size({"world_size": 4}, 2, where="d")


def test_learner_state_splits_into_replicated_and_own_parts() -> None:
    state = {"model": 1, "optimizer": 2, "examples_trained": 3, **{k: f"own-{k}" for k in PER_RANK_LEARNER_KEYS}}
    shared, own = split_learner_state(state)
    assert set(own) == set(PER_RANK_LEARNER_KEYS) and "examples_trained" in shared and "model" in shared
    other = {k: f"rank1-{k}" for k in PER_RANK_LEARNER_KEYS}
    merged = merge_learner_state(state, other)
    assert merged["model"] == 1 and merged["replay"] == "rank1-replay"
    assert merge_learner_state(state, None) == state


# --------------------------------------------------------------------------- 2-process gloo groups
def _items() -> list[Item]:
    return [
        Item(item_id=f"i{n}", text=f"a {CATEGORIES[n % 3]} film, number {n}", categories=[CATEGORIES[n % 3]], ts=1)
        for n in range(18)
    ]


def _examples(start: int, n: int) -> list[Labeled]:
    rng = random.Random(start)
    out = []
    for k in range(start, start + n):
        user, item = k % 24, rng.randrange(18)
        out.append(Labeled(
            example_id=f"imp{k}:i{item}", impression_id=f"imp{k}", user_id=f"u{user}", item_id=f"i{item}",
            position=k % 5, label=int(rng.random() < (0.7 if item % 3 == user % 3 else 0.1)),
            history=[f"i{(user % 3) + 3 * j}" for j in range(3)],
            impression_ts=1_000 + k, label_ts=2_000 + k, ts=2_000 + k,
        ))  # fmt: skip
    return out


def _learner(catalog: Catalog) -> ContinualLearner:
    config = ModelConfig(encoder_layers=1, freeze_layers=1, max_text_len=16, embed_dim=32, max_history=8,
                         categories=CATEGORIES)
    return ContinualLearner(build_model(config), LearnerConfig(device="cpu", replay_size=64), catalog)


def _full_digest(learner: ContinualLearner) -> str:
    """Every tensor of the model and of both optimizers' states."""
    h = hashlib.sha256()
    tensors = list(learner.model.state_dict().values())
    for opt in learner.optimizers:
        for st in opt.state_dict()["state"].values():
            tensors += [v for _, v in sorted(st.items()) if isinstance(v, torch.Tensor)]
    for t in tensors:
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _join(rank: int, init_file: str, timeout_s: float = 60.0) -> Group:
    torch.set_num_threads(1)
    return Group.init(RankInfo(rank, 2, rank), device=torch.device("cpu"), timeout_s=timeout_s,
                      init_method=f"file://{init_file}")


def _train_worker(rank: int, init_file: str, out_dir: str) -> None:
    group = _join(rank, init_file)
    out: dict[str, Any] = {}
    # the lockstep round: sums, and rank 0's values for the main-only slots
    out["agree"] = group.agree({"due": rank + 1.0, "stop": 0.0}, main={"publish_time": 7.0 if rank == 0 else 99.0})

    # the weighted gradient average; a parameter one rank has no gradient for counts as zero there
    a, b, c = (torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True),
               torch.zeros(1, requires_grad=True))
    if rank == 0:
        a.grad = torch.full((2,), 1.0)
    else:
        a.grad, b.grad = torch.full((2,), 3.0), torch.full((3,), 2.0)
    out["total"] = average_gradients([a, b, c], 1.0 if rank == 0 else 3.0, group)
    out["a"], out["b"], out["c"] = a.grad.tolist(), b.grad.tolist(), c.grad  # (1*1 + 3*3) / 4; 3*2 / 4; None
    a.grad = torch.full((2,), 5.0 if rank == 0 else 1e9)  # rank 1 without examples: weight 0, ignored
    average_gradients([a], 2.0 if rank == 0 else 0.0, group)
    out["a_alone"] = a.grad.tolist()

    catalog = Catalog(_items())
    learner = _learner(catalog)
    averager = attach(learner, group)
    broadcast_model(learner.model, group)
    out["centred"] = sync_centring(learner, group)
    data = _examples(0, 80)
    d1, d2, d3, d4 = data[:16], data[16:32], data[32:48], data[48:56]
    if rank == 0:  # the same first step in one process, no group: rank 1 contributes nothing to it
        ref = _learner(catalog)
        ref.step(d1)
    ghost = [data[60].model_copy(update={"item_id": "ghost", "example_id": "imp60:ghost"})]
    rounds = [(d1, []), (d2, d3), ([], d4)]
    digests = []
    for n, (mine0, mine1) in enumerate(rounds):
        stats, trained = synced_step(learner, mine0 if rank == 0 else mine1, group, averager)
        out[f"round{n}"] = {"trained": trained, "stats": stats is not None, "calls": averager.calls,
                            "examples_trained": learner.examples_trained}
        if n == 0 and rank == 0:
            out["equals_single_process"] = _full_digest(learner) == _full_digest(ref)
        digests.append(_full_digest(learner))
    before = _full_digest(learner)  # a round where the only rank with examples drops them all (unknown item)
    stats, trained = synced_step(learner, [] if rank == 0 else ghost, group, averager)
    out["ghost"] = {"trained": trained, "unchanged": _full_digest(learner) == before, "calls": averager.calls}
    out["digests"] = digests
    out["replica"] = replica_digest(learner.model)
    out["replay"] = len(learner.replay)
    out["gathered"] = group.gather_object({"rank": rank})
    out["decision"] = group.broadcast_object("from rank 0" if rank == 0 else "ignored")
    group.close()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))


def _spawn(fn: Any, tmp_path: Path) -> list[dict[str, Any]]:
    init_file = tmp_path / "store"
    mp.spawn(fn, args=(str(init_file), str(tmp_path)), nprocs=2, join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def test_lockstep_learners_stay_bit_identical(tmp_path: Path) -> None:
    r0, r1 = _spawn(_train_worker, tmp_path)
    for r in (r0, r1):
        assert r["agree"] == {"due": 3.0, "stop": 0.0, "publish_time": 7.0}
        assert r["total"] == 4.0 and r["a"] == [2.5, 2.5] and r["b"] == [1.5, 1.5, 1.5] and r["c"] is None
        assert r["a_alone"] == [5.0, 5.0]
        assert r["centred"] is True
        assert r["decision"] == "from rank 0"
    # rank 0 alone with 16 examples, rank 1 empty: exactly the single-process step
    assert r0["equals_single_process"] is True
    # every rank made updates_per_batch (2) synchronized updates in every round, the empty one included
    for n, trained in enumerate((16, 32, 8)):
        for r in (r0, r1):
            assert r[f"round{n}"]["trained"] == trained and r[f"round{n}"]["calls"] == 2
        assert r0[f"round{n}"]["examples_trained"] == r1[f"round{n}"]["examples_trained"]
    assert r0["round2"]["examples_trained"] == 56  # the group's count, on every rank
    assert (r0["round0"]["stats"], r1["round0"]["stats"]) == (True, False)
    # the replicas (model and optimizer states) are equal bit for bit after every round
    assert r0["digests"] == r1["digests"] and len(set(r0["digests"])) == 3
    assert r0["replica"] == r1["replica"]
    # examples no rank could train (item not in the catalog): no update anywhere
    assert r0["ghost"] == r1["ghost"] == {"trained": 0, "unchanged": True, "calls": 2}
    assert (r0["replay"], r1["replay"]) == (32, 24)  # each rank's own replay buffer
    assert r0["gathered"] == [{"rank": 0}, {"rank": 1}] and r1["gathered"] is None


def _dead_worker(rank: int, init_file: str, out_dir: str) -> None:
    group = _join(rank, init_file, timeout_s=20.0)
    group.barrier()
    if rank == 1:
        os._exit(0)  # dies without a word (as under SIGKILL: its sockets close)
    time.sleep(1.0)
    started = time.monotonic()
    try:
        group.agree({"due": 1.0})
        out = {"raised": None}
    except GroupError as exc:
        out = {"raised": str(exc), "seconds": time.monotonic() - started}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))
    Path(out_dir, "rank1.json").write_text("{}")
    os._exit(0)  # not through the destructors of a broken gloo group (they may abort the process)


def test_a_rank_that_dies_fails_the_next_collective_clearly(tmp_path: Path) -> None:
    r0, _ = _spawn(_dead_worker, tmp_path)
    assert r0["raised"] is not None, "the round went on without rank 1"
    assert "rank 0/2: the lockstep round failed: another rank died or did not answer" in r0["raised"]
    assert "resumes from the last one" in r0["raised"]
    assert r0["seconds"] < 25
