"""Trainer throughput: examples/s of ``ContinualLearner.step`` for several fine-tuning depths.

Configurations (all-MiniLM-L6-v2, 6 layers, multi-task heads, replay + distillation on):

- ``frozen``: the whole encoder frozen (the default); the prefix cache holds each item's pooled
  output, and the projection, id embeddings, towers and heads learn on it;
- ``top``: the top layer tuned on cached outputs of the 5 frozen layers;
- ``lora``: LoRA adapters on the top layer, on cached prefixes;
- ``full``: full fine-tuning (embeddings and all 6 layers).

The stream is MovieLens-100k (real titles; slates of 10) or the synthetic
stream.  Caches are warm (every catalog item's prefix computed once before
timing, as in a long-running trainer where items repeat) unless ``--cold``.
Printed per configuration: batch size, unique items and tokens per batch,
step time, examples/s, the encoder's achieved TFLOP/s and, with a peak
(``--peak-tflops``, default the GPU's bf16 dense peak when known), its
model-FLOPs utilisation.  The last line is JSON.

    python benchmarks/trainer_throughput.py                  # CPU: frozen, top, full
    python benchmarks/trainer_throughput.py --configs top --batch-size 4096
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from trainer.catalog import Catalog  # noqa: E402
from trainer.learner import ContinualLearner, LearnerConfig, resolve_device  # noqa: E402
from trainer.model import ModelConfig, build_model  # noqa: E402

log = logging.getLogger("trainer_throughput")

CONFIGS = {
    "frozen": {"freeze_layers": 6},
    "top": {"freeze_layers": 5},
    "lora": {"freeze_layers": 5, "lora_rank": 8},
    "full": {"freeze_layers": 0},
}
DEFAULT = "frozen"  # ModelConfig's default freeze_layers: the whole encoder
CPU_TARGET = 4_000.0  # examples/s, default configuration, this project's 2-core CPU
GPU_TARGET = 100_000.0  # examples/s, full fine-tuning in bf16
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L4": 121.0, "A10": 125.0}


def gpu_peak() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, peak in PEAK_BF16_TFLOPS.items():
        if key in name:
            return peak
    return None


def layer_flops_per_token(hidden: int, intermediate: int, seq: float) -> float:
    """Forward FLOPs of one BERT layer per token: the four projections, the FFN, attention."""
    return 2.0 * (4 * hidden * hidden + 2 * hidden * intermediate) + 4.0 * seq * hidden


def load_stream(args: argparse.Namespace, n_examples: int):  # noqa: ANN201
    from harness.replays import load_movielens, load_synthetic

    if args.dataset == "movielens":
        ratings = max(2_000, n_examples // 10 + 1)
        replay = load_movielens(limit=ratings, slate_size=10, seed=0, history_length=args.max_history)
    else:
        replay = load_synthetic(events=n_examples // 10 + 1, seed=0, history_length=args.max_history)
    return replay


def run_config(name: str, args: argparse.Namespace, replay, device: torch.device) -> dict:  # noqa: ANN001
    catalog = Catalog(replay.items)
    config = ModelConfig(
        max_text_len=args.max_text_len,
        max_history=args.max_history,
        categories=catalog.category_names(),
        value_head=replay.name == "movielens",
        **CONFIGS[name],
    )
    model = build_model(config)
    learner = ContinualLearner(model, LearnerConfig(device=args.device), catalog)
    learner.set_teacher({k: v.clone() for k, v in model.trainable_state_dict().items()})
    tower = model.item_tower
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    examples = replay.examples
    bs = args.batch_size
    needed = (args.warmup + args.steps) * bs
    if len(examples) < needed:
        raise SystemExit(f"stream has {len(examples)} examples, {needed} needed")
    if not args.cold and model.prefix_cache is not None:
        ids = catalog.item_ids()
        t0 = time.perf_counter()
        with torch.no_grad():
            for i in range(0, len(ids), 1024):
                chunk = ids[i : i + 1024]
                model.encode_items([catalog.text(x) for x in chunk], chunk, [catalog.text_hash(x) for x in chunk])
        log.info("%s: prefix cache warmed with %d items in %.1fs", name, len(ids), time.perf_counter() - t0)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for i in range(args.warmup):
        learner.step(examples[i * bs : (i + 1) * bs])
    sync()
    times, cpu_times, stats = [], [], []
    for i in range(args.warmup, args.warmup + args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        s = learner.step(examples[i * bs : (i + 1) * bs])
        sync()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        stats.append(s)

    total = sum(times)
    n_ex = sum(s["examples"] for s in stats)
    tokens = statistics.mean(s["item_tokens"] for s in stats)
    items = statistics.mean(s["unique_items"] for s in stats)
    prefix_tokens = statistics.mean(s["prefix_tokens"] for s in stats)
    enc_cfg = tower.encoder.config
    seq = tokens / items if items else 0.0
    per_token = layer_flops_per_token(enc_cfg.hidden_size, enc_cfg.intermediate_size, seq)
    trainable_layers = tower.n_layers - tower.frozen
    factor = 2.0 if config.lora_rank else 3.0  # LoRA: no weight gradients of the base layers
    if tower.frozen == 0:
        factor = 3.0
    flops = tokens * trainable_layers * per_token * factor + prefix_tokens * tower.frozen * per_token
    step_s = total / len(times)
    tflops = flops / step_s / 1e12
    peak = args.peak_tflops if args.peak_tflops else (gpu_peak() if device.type == "cuda" else None)
    result = {
        "config": name,
        "trainable_params": n_trainable,
        "batch_size": bs,
        "examples_per_s": n_ex / total,
        "best_step_examples_per_s": max(s["examples"] / t for s, t in zip(stats, times, strict=True)),
        "step_ms": 1000 * step_s,
        # on a shared CPU the wall clock includes other processes' time slices: CPU seconds of
        # this process spread over its threads estimate the uncontended rate
        "cpu_s_per_step": sum(cpu_times) / len(cpu_times),
        "examples_per_cpu_thread_s": n_ex / (sum(cpu_times) / torch.get_num_threads()),
        "unique_items_per_batch": items,
        "encoder_tokens_per_batch": tokens,
        "replayed_per_batch": statistics.mean(s["replayed"] for s in stats),
        "encoder_tflops_per_s": tflops,
        "mfu": tflops / peak if peak else None,
    }
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="frozen,top,full", help=f"comma-separated subset of {','.join(CONFIGS)}")
    p.add_argument("--dataset", choices=("movielens", "synthetic"), default="movielens")
    p.add_argument("--batch-size", type=int, default=8192, help="examples per step (items repeat: bigger batches share more)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per config (default: 3 CPU, 20 CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 1 CPU, 3 CUDA)")
    p.add_argument("--max-history", type=int, default=20)
    p.add_argument("--max-text-len", type=int, default=32)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--cold", action="store_true", help="do not pre-warm the prefix cache")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak of the device for MFU (default: known GPUs' bf16 dense peak)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    args.steps = args.steps or (20 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = set(names) - set(CONFIGS)
    if unknown:
        p.error(f"unknown configs {sorted(unknown)}")

    t0 = time.perf_counter()
    replay = load_stream(args, (args.warmup + args.steps) * args.batch_size)
    log.info("%s stream: %d examples in %.1fs", replay.name, len(replay.examples), time.perf_counter() - t0)
    dev_name = torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {dev_name}, bf16 autocast: {cuda}, dataset: {replay.name}, batch size {args.batch_size}")
    print(
        f"{'config':<8}{'trainable':>12}{'batch':>7}{'items/b':>9}{'tokens/b':>10}{'step ms':>10}{'ex/s':>11}"
        f"{'ex/s cpu':>10}{'TFLOP/s':>9}{'MFU':>7}"
    )
    if not cuda:
        load = os.getloadavg()[0]
        print(f"(load average {load:.1f} on {os.cpu_count()} cores; 'ex/s cpu' = examples per second of this "
              f"process's CPU time over its {torch.get_num_threads()} threads, the rate without other load)")
    results = []
    for name in names:
        r = run_config(name, args, replay, device)
        results.append(r)
        mfu = f"{100 * r['mfu']:6.1f}%" if r["mfu"] is not None else f"{'-':>7}"
        print(
            f"{name:<8}{r['trainable_params']:>12,}{r['batch_size']:>7}{r['unique_items_per_batch']:>9.0f}"
            f"{r['encoder_tokens_per_batch']:>10.0f}{r['step_ms']:>10.0f}{r['examples_per_s']:>11,.0f}"
            f"{r['examples_per_cpu_thread_s'] if not cuda else r['examples_per_s']:>10,.0f}"
            f"{r['encoder_tflops_per_s']:>9.2f}{mfu}",
            flush=True,
        )
    by = {r["config"]: r for r in results}
    summary = {
        "benchmark": "trainer_throughput",
        "device": dev_name,
        "dataset": replay.name,
        "batch_size": args.batch_size,
        "results": by,
    }
    if not cuda:
        summary["load_average"] = os.getloadavg()[0]
    if DEFAULT in by and not cuda:
        summary["default_config"] = DEFAULT
        summary["default_examples_per_s"] = by[DEFAULT]["examples_per_s"]
        summary["default_examples_per_cpu_thread_s"] = by[DEFAULT]["examples_per_cpu_thread_s"]
        summary["cpu_target"] = CPU_TARGET
        summary["meets_cpu_target"] = by[DEFAULT]["examples_per_s"] >= CPU_TARGET
    if "full" in by and cuda:
        summary["gpu_full_target"] = GPU_TARGET
        summary["meets_gpu_target"] = by["full"]["examples_per_s"] >= GPU_TARGET
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
