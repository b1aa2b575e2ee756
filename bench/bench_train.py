"""Training throughput and peak memory: a straightforward MDLM step vs our MDLMTrainer path.

    python bench/bench_train.py WORKLOAD --baseline dllm-recipe   # side by side with dllm's recipe
                                                                 # (bench/side_by_side.py, README)
    python bench/bench_train.py            # default (~3 min on a 2-core CPU)
    python bench/bench_train.py --quick    # ~30 s smoke run
    python bench/bench_train.py --device cuda --dtype bf16 --batch-size 32   # GPU (adds MFU)

Variants (each run in a FRESH subprocess, so the peak RSS of one cannot leak into another, and
interleaved baseline/optimised over --repeats rounds; figures are medians over the rounds):

- baseline: the straightforward MDLM step. Every row padded to max_length (padding masked out of
  attention and loss), the output head over the full vocabulary at every position, float32
  logits, cross-entropy over [B*L, V] with ignore_index on unmasked positions, 1/t weights.
- packed:   OUR path, the default optimised one. DiffusionCollator with padding-free packing
  (pack_sequences) + MDLMTrainer.compute_loss (per-sample noise, head + chunked CE only at the
  masked positions via families.masked_token_loss, block-diagonal attention).
- grouped:  OUR path without packing (--variants baseline,packed,grouped): rows ordered by HF's
  length-grouped sampler (group_by_length), padded per batch (LLaDA: trainable EOS padding, as in
  training). With few timed rows the groups are just the baseline's batches sorted.

Every variant runs the same number of AdamW steps (with grad clipping 1.0) over the same rows
(grouped: the same rows, reordered into length groups). Throughput counts the rows' trainable
tokens (response tokens; padding never counts) per second of forward + backward + optimizer
step, collation included. Peak memory is VmHWM of the worker process on CPU (whole process:
interpreter, weights, AdamW state and activations) or torch.cuda.max_memory_allocated on GPU.

Ratios: train_speedup = optimised tokens/s / baseline tokens/s; memory_ratio = optimised peak /
baseline peak ("optimised" = the first non-baseline variant, packed by default). Everything goes
to --out as JSON; the last line printed is `train_speedup=<x> memory_ratio=<y>`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

VARIANTS = ("baseline", "packed", "grouped")


# ---- settings ------------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", default="naive", choices=["naive", "dllm-recipe"],
                    help="naive: this per-step comparison; dllm-recipe: whole training runs side by side with "
                         "dllm's recipe on a workload folder (bench_train.py WORKLOAD --baseline dllm-recipe)")
    ap.add_argument("--model", default="", help="a real model folder (llada/dream); default: a random LLaDA from config")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--mlp", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--min-length", type=int, default=16)
    ap.add_argument("--median-length", type=float, default=96.0, help="median row length of the log-normal length mix")
    ap.add_argument("--length-sigma", type=float, default=0.9, help="log-normal sigma of row lengths (long tail)")
    ap.add_argument("--batch-size", type=int, default=8, help="rows per optimizer step")
    ap.add_argument("--steps", type=int, default=2, help="timed optimizer steps per variant and round")
    ap.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first (other rows)")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved rounds; figures are medians over rounds")
    ap.add_argument("--variants", default="baseline,packed",
                    help="baseline plus any of packed, grouped (the first after baseline is the one the ratios are for)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast (weights stay float32)")
    ap.add_argument("--lora", action="store_true", help="train a LoRA adaptor (r 16, all linear layers) instead")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (both variants)")
    ap.add_argument("--ce-chunk-size", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads in the workers (0: what training uses, dllm_trainer.training.cpu.default_cpu_threads)")
    ap.add_argument("--threads-check", action="store_true",
                    help="also time our packed step with the chosen threads vs torch's default (one per core), interleaved")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="peak dense TFLOP/s for MFU (H100 bf16: 989)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="small run (~30 s): fewer steps, one round")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "train.json"))
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--default-threads", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.batch_size, args.steps, args.warmup, args.repeats = 4, 1, 1, 1
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variant_list if v not in VARIANTS]
    if bad or "baseline" not in args.variant_list or len(args.variant_list) < 2:
        ap.error(f"--variants: baseline plus at least one of {VARIANTS[1:]} (got {args.variants})")
    return args


# ---- data ------------------------------------------------------------------------------------------
def make_rows(args, vocab_size: int, reserved: set[int]) -> list[dict]:
    """Chat-like rows: prompt + response, lengths log-normal (long tail) clipped to [min, max]."""
    import numpy as np

    rng = np.random.default_rng(args.seed)
    n = (args.warmup + args.steps) * args.batch_size
    lengths = np.exp(rng.normal(math.log(args.median_length), args.length_sigma, n))
    lengths = np.clip(np.round(lengths), args.min_length, args.max_length).astype(int)
    rows = []
    for i, L in enumerate(lengths.tolist()):
        ids = rng.integers(3, vocab_size - 1, L)
        ids = [int(x) if int(x) not in reserved else 3 for x in ids]
        p = int(L * rng.uniform(0.2, 0.6))
        rows.append({"input_ids": ids, "labels": [-100] * p + ids[p:], "prompt_len": p, "sample_index": i})
    return rows


def step_batches(args, rows, variant: str):
    """(warmup row lists, timed row lists): batch_size rows per optimizer step."""
    B = args.batch_size
    warm, timed = rows[: args.warmup * B], rows[args.warmup * B :]
    if variant == "grouped":  # HF's group_by_length order, over the timed rows only
        import torch
        from transformers.trainer_pt_utils import get_length_grouped_indices

        g = torch.Generator().manual_seed(args.seed)
        order = get_length_grouped_indices([len(r["input_ids"]) for r in timed], B, generator=g)
        timed = [timed[i] for i in order]
    chunk = lambda rs: [rs[i : i + B] for i in range(0, len(rs), B)]  # noqa: E731
    return chunk(warm), chunk(timed)


# ---- memory ------------------------------------------------------------------------------------------
def proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return -1


# ---- one variant in this (fresh) process -----------------------------------------------------------------
def build_model(args, device):
    import torch

    torch.manual_seed(args.seed)
    if args.model:
        from transformers import AutoModel

        import dllm_trainer.models  # noqa: F401 - registers LLaDA/Dream

        model = AutoModel.from_pretrained(args.model, dtype=torch.float32)
    else:
        from dllm_trainer.models.llada import LLaDAConfig, LLaDAModelLM

        V = args.vocab
        config = LLaDAConfig(
            d_model=args.d_model, n_heads=args.heads, n_kv_heads=args.heads, n_layers=args.layers,
            mlp_hidden_size=args.mlp, vocab_size=V, embedding_size=V, max_sequence_length=max(args.max_length, 512),
            mask_token_id=V - 1, eos_token_id=2, pad_token_id=2, rope_theta=10000.0,
        )
        model = LLaDAModelLM(config)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
    model.to(device).train()
    return model


def run_worker(args) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from dllm_trainer.families import get_family

    # Both variants import the same libraries, so the peak RSS compares training steps, not imports.
    import dllm_trainer.training.collator  # noqa: F401
    import dllm_trainer.training.trainer  # noqa: F401

    variant = args.worker
    device = torch.device(args.device)
    threads = args.threads
    if device.type == "cpu":
        if not threads:
            from dllm_trainer.training.cpu import default_cpu_threads

            threads = default_cpu_threads()
        torch.set_num_threads(threads)
    model = build_model(args, device)
    family = get_family(model)
    cfg = model.config
    mask_id = int(cfg.mask_token_id)
    vocab = int(getattr(cfg, "vocab_size"))
    eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, int) else 2
    pad = cfg.pad_token_id if isinstance(cfg.pad_token_id, int) else eos
    rows = make_rows(args, vocab, {mask_id, eos, pad})
    warm, timed = step_batches(args, rows, variant)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)  # what HF Trainer uses (adamw_torch_fused)
    # Our batches change shape every step (packed length, number of masked tokens): compile those
    # with dynamic shapes once instead of recompiling per shape; the baseline's shapes are fixed.
    fwd = torch.compile(model, dynamic=variant != "baseline") if args.compile else model

    if variant == "baseline":
        gen = torch.Generator().manual_seed(args.seed)
        L = args.max_length

        def step(batch_rows):
            B = len(batch_rows)
            ids = torch.full((B, L), pad, dtype=torch.long)
            labels = torch.full((B, L), -100, dtype=torch.long)
            am = torch.zeros((B, L), dtype=torch.long)
            for b, r in enumerate(batch_rows):
                n = len(r["input_ids"])
                ids[b, :n] = torch.tensor(r["input_ids"])
                labels[b, :n] = torch.tensor(r["labels"])
                am[b, :n] = 1
            ids, labels, am = ids.to(device), labels.to(device), am.to(device)
            t = (1e-3 + (1 - 1e-3) * torch.rand(B, generator=gen)).to(device)
            masked = (torch.rand(B, L, generator=gen).to(device) < t[:, None]) & (labels != -100)
            noisy = torch.where(masked, torch.full_like(ids, mask_id), ids)
            with autocast:
                logits = fwd(input_ids=noisy, attention_mask=am).logits
            logits = family.align_logits(logits.float())  # [B, L, V] float32 (Dream: shifted)
            target = torch.where(masked, labels, torch.full_like(labels, -100))
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none",
                                 ignore_index=-100)
            loss = (ce * (1.0 / t)[:, None].expand(B, L).reshape(-1)).sum() / (labels != -100).sum().clamp(min=1)
            return loss
    else:
        import tempfile

        from transformers import TrainingArguments
        from transformers.utils import logging as hf_logging

        from dllm_trainer.training.collator import DiffusionCollator
        from dllm_trainer.training.trainer import DiffusionSettings, MDLMTrainer

        hf_logging.set_verbosity_error()
        collator = DiffusionCollator(
            family=family, pad_token_id=pad, eos_token_id=eos, seed=args.seed,
            perbatch_cutoff=False,  # same rows as the baseline (no Dream response cutoffs)
            pack_length=args.max_length if variant == "packed" else None,
        )
        targs = TrainingArguments(output_dir=tempfile.mkdtemp(prefix="bench_train_"), report_to=[],
                                  use_cpu=device.type == "cpu", per_device_train_batch_size=args.batch_size)
        trainer = MDLMTrainer(model=model, args=targs, diffusion=DiffusionSettings(
            family=family, mask_token_id=mask_id, weight_kind="scheduler", seed=args.seed,
            ce_chunk_size=args.ce_chunk_size))

        def step(batch_rows):
            batch = {k: v.to(device) for k, v in collator(batch_rows).items()}
            with autocast:
                return trainer.compute_loss(fwd, batch)

    def optimizer_step(batch_rows):
        loss = step(batch_rows)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    setup_kib = proc_status_kib("VmRSS")
    for b in warm:
        optimizer_step(b)
    if device.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
    step_times, step_tokens, losses = [], [], []
    for b in timed:
        sync()
        t0 = time.perf_counter()
        losses.append(optimizer_step(b))
        sync()
        step_times.append(time.perf_counter() - t0)
        step_tokens.append(sum(sum(l != -100 for l in r["labels"]) for r in b))
    total_time, tokens = sum(step_times), sum(step_tokens)
    n_params = sum(p.numel() for p in model.parameters())
    n_embed = model.get_input_embeddings().weight.numel()
    out = {
        "variant": variant,
        "threads": threads if device.type == "cpu" else None,
        "steps": len(timed),
        "rows": sum(len(b) for b in timed),
        "trainable_tokens": tokens,
        "time_s": total_time,
        "tokens_per_s": tokens / total_time,
        "step_times_s": step_times,
        "losses": losses,
        "params": n_params,
        "trainable_params": sum(p.numel() for p in params),
        "setup_rss_mib": setup_kib / 1024,
    }
    if device.type == "cuda":
        out["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["peak_kind"] = "torch.cuda.max_memory_allocated"
        flops = 6 * (n_params - n_embed) * out["tokens_per_s"]
        out["mfu"] = flops / (args.peak_tflops * 1e12)
    else:
        out["peak_mib"] = proc_status_kib("VmHWM") / 1024
        out["peak_kind"] = "VmHWM (whole process RSS high-water mark)"
        out["peak_above_setup_mib"] = out["peak_mib"] - out["setup_rss_mib"]
    assert all(np.isfinite(losses)), losses
    return out


def run_threads_check_worker(args) -> dict:
    """Our packed optimizer step timed alternately with --threads and with torch's default thread
    count (one per core), in one process, ABAB...; medians of the per-step times."""
    import torch

    from dllm_trainer.training.collator import DiffusionCollator
    from dllm_trainer.families import get_family
    from dllm_trainer.training.trainer import DiffusionSettings, MDLMTrainer
    from transformers import TrainingArguments
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    default = args.default_threads
    model = build_model(args, torch.device("cpu"))
    fam, cfg = get_family(model), model.config
    rows = make_rows(args, cfg.vocab_size, {cfg.mask_token_id, 2})
    collator = DiffusionCollator(family=fam, pad_token_id=2, eos_token_id=2, perbatch_cutoff=False,
                                 pack_length=args.max_length)
    import tempfile

    trainer = MDLMTrainer(model=model, args=TrainingArguments(output_dir=tempfile.mkdtemp(), report_to=[], use_cpu=True),
                          diffusion=DiffusionSettings(family=fam, mask_token_id=cfg.mask_token_id))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    batch = collator(rows[: args.batch_size])

    def step():
        trainer.compute_loss(model, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    times: dict[int, list[float]] = {args.threads: [], default: []}
    for r in range(6):
        for th in (args.threads, default) if r % 2 == 0 else (default, args.threads):
            torch.set_num_threads(th)
            t0 = time.perf_counter()
            step()
            times[th].append(time.perf_counter() - t0)
    chosen, dflt = statistics.median(times[args.threads]), statistics.median(times[default])
    return {"chosen_threads": args.threads, "default_threads": default, "median_step_s_chosen": chosen,
            "median_step_s_default": dflt, "speedup_chosen_vs_default": dflt / chosen,
            "step_times_s": {str(k): v for k, v in times.items()}}


def run_threads_check(args, argv) -> dict:
    import torch

    default = torch.get_num_threads()  # torch's own default in a fresh process: one per core
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", "threads_check",
           "--default-threads", str(default)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit("threads check failed")
    res = json.loads([l for l in proc.stdout.splitlines() if l.startswith("{")][-1])
    print(f"threads check: {res['chosen_threads']} thread(s) {res['median_step_s_chosen']:.3f} s/step vs torch default "
          f"{res['default_threads']} {res['median_step_s_default']:.3f} s/step: x{res['speedup_chosen_vs_default']:.2f}",
          flush=True)
    return res


# ---- driver ----------------------------------------------------------------------------------------------
def run_variant(args, variant: str, argv: list[str]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", variant]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"bench worker '{variant}' failed (exit {proc.returncode})")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return {**json.loads(line), "worker_wall_s": wall}
    raise SystemExit(f"bench worker '{variant}' printed no result")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--baseline=dllm-recipe" in argv or any(
            a == "--baseline" and b == "dllm-recipe" for a, b in zip(argv, argv[1:])):
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import side_by_side

        return side_by_side.main(argv)
    user_argv = list(argv)
    args = parse_args(argv)
    if args.worker:
        res = run_threads_check_worker(args) if args.worker == "threads_check" else run_worker(args)
        print(json.dumps(res), flush=True)
        return 0
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA GPU is visible")

    if args.device == "cpu" and not args.threads:
        # Chosen ONCE here (from the load now) and passed to every worker: all variants use the same.
        from dllm_trainer.training.cpu import default_cpu_threads

        args.threads = default_cpu_threads()
    if args.device == "cpu":
        argv = [*argv, "--threads", str(args.threads)]

    started = time.perf_counter()
    threads_check = run_threads_check(args, argv) if args.threads_check else None
    runs: dict[str, list[dict]] = {v: [] for v in args.variant_list}
    for r in range(args.repeats):
        order = args.variant_list if r % 2 == 0 else list(reversed(args.variant_list))  # ABBA interleaving
        for v in order:
            res = run_variant(args, v, argv)
            runs[v].append(res)
            print(f"[round {r + 1}/{args.repeats}] {v:9s} {res['tokens_per_s']:9.1f} tok/s  "
                  f"peak {res['peak_mib']:8.1f} MiB  loss {res['losses'][-1]:.3f}", flush=True)

    med = lambda v, k: statistics.median(x[k] for x in runs[v])  # noqa: E731
    summary = {}
    for v in args.variant_list:
        summary[v] = {k: med(v, k) for k in ("tokens_per_s", "peak_mib", "time_s")}
        if "peak_above_setup_mib" in runs[v][0]:
            summary[v]["peak_above_setup_mib"] = med(v, "peak_above_setup_mib")
        if "mfu" in runs[v][0]:
            summary[v]["mfu"] = med(v, "mfu")
    base = summary["baseline"]
    for v in args.variant_list[1:]:
        s = summary[v]
        s["speedup_vs_baseline"] = s["tokens_per_s"] / base["tokens_per_s"]
        s["memory_ratio_vs_baseline"] = s["peak_mib"] / base["peak_mib"]
        if "peak_above_setup_mib" in s:
            s["memory_above_setup_ratio_vs_baseline"] = s["peak_above_setup_mib"] / base["peak_above_setup_mib"]
        # paired per-round ratios (each round's runs are adjacent in time: robust to load drift)
        s["paired_speedups"] = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(runs[v], runs["baseline"])]
    main_variant = args.variant_list[1]
    speedup = summary[main_variant]["speedup_vs_baseline"]
    mem_ratio = summary[main_variant]["memory_ratio_vs_baseline"]

    print()
    for v in args.variant_list:
        s = summary[v]
        extra = "" if v == "baseline" else f"  x{s['speedup_vs_baseline']:.2f} speed, x{s['memory_ratio_vs_baseline']:.2f} memory"
        mfu = f"  MFU {100 * s['mfu']:.1f}%" if "mfu" in s else ""
        print(f"{v:9s} {s['tokens_per_s']:9.1f} trainable tok/s  peak {s['peak_mib']:8.1f} MiB{mfu}{extra}")

    settings = {k: v for k, v in vars(args).items() if k not in ("worker", "variant_list")}
    settings["variants"] = args.variant_list
    settings["optimised_variant"] = main_variant
    settings["trainable_tokens_per_round"] = runs["baseline"][0]["trainable_tokens"]
    settings["params"] = runs["baseline"][0]["params"]
    settings["command"] = " ".join([os.path.relpath(sys.executable, ROOT), "bench/bench_train.py", *user_argv])
    out = {
        "settings": settings,
        "summary": summary,
        "train_speedup": speedup,
        "memory_ratio": mem_ratio,
        "runs": runs,
        "threads_check": threads_check,
        "wall_s": time.perf_counter() - started,
        "host": {"cpu_count": os.cpu_count(), "load_avg": os.getloadavg()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=2)
    print(f"wrote {args.out} ({out['wall_s']:.0f} s)")
    print(f"train_speedup={speedup:.2f} memory_ratio={mem_ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
