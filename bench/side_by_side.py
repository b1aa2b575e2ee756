"""Side by side on one workload: our `llada` full fine-tune vs dllm's LLaDA SFT recipe.

    python bench/bench_train.py WORKLOAD --baseline dllm-recipe            # see bench/README.md

WORKLOAD is a folder written by make_workload.py (``model/`` LLaDA checkpoint + tokenizer,
``data.jsonl`` prompt/completion rows, ``workload.json``). When the folder does not exist and a
generator is available (``DLLM_WORKLOAD_TOOL``, else ``../shared/bench/make_workload.py`` next to
the repository), it is generated first with ``--vocab``.

Runs, each a FRESH process (wall clock and peak RSS of the whole process, from os.wait4):

- ours:         ``run_training`` with the form's defaults, except full fine-tune (lora off),
                batch 8, max_length 512, learning rate 1e-3 constant, eval off, seed 42, CPU.
- dllm-recipe:  dllm's ``examples/llada/sft.py`` recipe (commit ca176752) rebuilt with transformers
                alone: HF Trainer, DataCollatorForSeq2Seq padding labels with the EOS/pad id and no
                attention mask, random sampler, fp32, the model's full-vocabulary logits at every
                position, cross-entropy over all trainable tokens (EOS padding included), weights
                1/(t + 1e-6), normalised per micro-batch by its trainable tokens, the same
                training arguments as ours (plus dllm's logging/checkpoint defaults). Same model
                implementation as ours.
- dllm:         only when ``DLLM_SRC`` points at a dllm checkout: the real ``examples/llada/sft.py``
                run unmodified by ``DLLM_PYTHON`` (default: this interpreter; dllm pins
                transformers 4.57, so usually a separate venv) with the same settings.

On a GPU (``--device cuda``) every side runs on CUDA device 0 in its GPU defaults: ours with the
form's ``dtype`` (auto: bfloat16 where supported), the recipe and the real dllm with dllm's
(weights loaded in bfloat16, ``bf16=True``). Memory is then the peak of
``torch.cuda.max_memory_allocated`` in each run, and each side gets an MFU: model FLOPs
``6 * parameters * positions computed per step`` (positions = its batches' padded shape, the
standard dense count; ours computes the head only at masked positions, so for it this counts FLOPs
it skipped) over s/step and ``--peak-tflops``.

Seconds per step = (wall(long run) - wall(short run)) / (long - short) steps (``--steps 100,50``):
everything a run pays once (imports, loading, tokenising, the final save) cancels, and so do
fraction-based schedules (both save checkpoints at fixed fractions of the run). Each run also
records the time between the ``on_step_end`` of step ``short`` and of step ``long`` (the
``window``), and for ours and dllm-recipe a profile of that window by phase.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIDES = ("ours", "dllm-recipe", "dllm")
DLLM_SFT = Path("examples") / "llada" / "sft.py"
PROFILE_PHASES = ("data", "noise", "forward", "head_ce", "loss_other", "backward", "optimizer", "logging",
                  "checkpoint", "other")


# ---- workload ------------------------------------------------------------------------------------
def workload_tool() -> Path | None:
    env = os.environ.get("DLLM_WORKLOAD_TOOL", "").strip()
    if env:
        return Path(env)
    default = ROOT.parent / "shared" / "bench" / "make_workload.py"
    return default if default.is_file() else None


def resolve_workload(path: str, vocab: int | None) -> Path:
    """The workload folder, generated first when it does not exist and a generator is known."""
    wl = Path(path).resolve()
    if not wl.exists():
        tool = workload_tool()
        if tool is None or not tool.is_file():
            raise SystemExit(
                f"workload folder {wl} does not exist and no generator was found: pass a folder written by "
                "make_workload.py, or set DLLM_WORKLOAD_TOOL to make_workload.py")
        cmd = [sys.executable, str(tool), str(wl)] + (["--vocab", str(vocab)] if vocab else [])
        print("generating the workload: " + " ".join(cmd), flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
            raise SystemExit(f"make_workload.py failed (exit {proc.returncode})")
    missing = [p for p in ("model/config.json", "data.jsonl") if not (wl / p).is_file()]
    if missing:
        raise SystemExit(f"{wl} is not a workload folder (missing {', '.join(missing)}); see make_workload.py")
    cfg = json.loads((wl / "model" / "config.json").read_text())
    if vocab and cfg.get("vocab_size") != vocab:
        raise SystemExit(f"--vocab {vocab} but the workload in {wl} has vocab {cfg.get('vocab_size')}")
    return wl


def workload_summary(wl: Path) -> dict:
    cfg = json.loads((wl / "model" / "config.json").read_text())
    info = json.loads((wl / "workload.json").read_text()) if (wl / "workload.json").is_file() else {}
    with open(wl / "data.jsonl") as fh:
        rows = sum(1 for line in fh if line.strip())
    return {"path": str(wl), "rows": rows, **{k: cfg.get(k) for k in ("vocab_size", "d_model", "n_layers", "n_heads")},
            "generator": {k: info.get(k) for k in ("seed", "n_params")} if info else None}


# ---- profiling (wall-clock regions, nested by call stack) -------------------------------------------------
class Regions:
    """Accumulates wall time per call path ("compute_loss/forward/head_ce") of wrapped callables."""

    def __init__(self):
        self.total: dict[str, float] = defaultdict(float)
        self.stack: list[str] = []

    def wrap(self, name, fn):
        regions = self

        def timed(*a, **k):
            regions.stack.append(name)
            path = "/".join(regions.stack)
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                regions.total[path] += time.perf_counter() - t0
                regions.stack.pop()

        timed.__wrapped__ = fn
        return timed

    def patch(self, owner, attr, name):
        setattr(owner, attr, self.wrap(name, getattr(owner, attr)))

    def snapshot(self) -> dict[str, float]:
        return dict(self.total)


def phase_profile(paths: dict[str, float], window_s: float, steps: int) -> dict:
    """Per-step seconds by phase, from the region totals (call paths) over the window."""

    def under(prefix):  # the region and everything nested in it
        return sum(v for k, v in paths.items() if k == prefix or k.startswith(prefix + "/"))

    def top(path):  # the region's own total (nested regions are part of it)
        return paths.get(path, 0.0)

    # head + cross-entropy inside the loss: our chunked head (inside the model's forward), or the
    # recipe's full head (inside forward) plus its cross-entropy (in compute_loss)
    head_ce = top("compute_loss/forward/head_ce") + top("compute_loss/head_ce")
    noise = top("compute_loss/noise")
    prof = {
        "data": top("data"),
        "noise": noise,
        "forward": top("compute_loss/forward") - top("compute_loss/forward/head_ce"),
        "head_ce": head_ce,
        "loss_other": top("compute_loss") - noise - top("compute_loss/forward") - top("compute_loss/head_ce"),
        "backward": top("backward"),
        "optimizer": top("clip_grad") + top("optimizer_step"),
        "logging": top("log_save_eval") - top("log_save_eval/checkpoint"),
        "checkpoint": top("log_save_eval/checkpoint"),
    }
    prof["other"] = window_s - sum(prof.values())
    out = {k: prof[k] / steps for k in PROFILE_PHASES}
    # part of backward: the chunked head's recomputation (checkpointed chunks)
    out["backward_head_recompute"] = under("backward/head_ce") / steps
    return out


def make_step_clock(regions: Regions, short: int, long: int, record: dict):
    """A TrainerCallback recording step end times, region snapshots at steps `short` and `long`,
    and (from get_batch_samples) the tokens each step computed on."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            record["train_begin_s"] = time.perf_counter()
            if optimizer is not None:
                regions.patch(optimizer, "step", "optimizer_step")

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            record.setdefault("step_end_s", []).append(now)
            if state.global_step in (short, long):
                record.setdefault("snapshots", {})[str(state.global_step)] = (now, regions.snapshot())
                record.setdefault("cpu_at", {})[str(state.global_step)] = time.process_time()

        def on_train_end(self, args, state, control, **kwargs):
            record["global_step"] = state.global_step
            record["log_history"] = [h for h in state.log_history if "loss" in h]

    return StepClock()


def instrument_trainer_class(regions: Regions, cls, batch_log: list):
    """Time the phases of HF's training loop on `cls` (a Trainer subclass) and accelerate's backward."""
    import accelerate

    orig_batches = cls.get_batch_samples

    def get_batch_samples(self, *a, **k):
        batches, n = orig_batches(self, *a, **k)
        for b in batches:
            ids, labels = b["input_ids"], b["labels"]
            batch_log.append({"shape": list(ids.shape), "trainable": int((labels != -100).sum())})
        return batches, n

    cls.get_batch_samples = regions.wrap("data", get_batch_samples)
    regions.patch(cls, "compute_loss", "compute_loss")
    regions.patch(cls, "_clip_grad_norm", "clip_grad")
    regions.patch(cls, "_maybe_log_save_evaluate", "log_save_eval")
    regions.patch(cls, "_save_checkpoint", "checkpoint")
    regions.patch(accelerate.Accelerator, "backward", "backward")


def summarise_record(record: dict, short: int, long: int) -> dict:
    snaps = record.get("snapshots", {})
    out = {"global_step": record.get("global_step"), "log_history": record.get("log_history", [])}
    ends, begin = record.get("step_end_s"), record.get("train_begin_s")
    if ends and begin:  # where a run's wall time went: before training, the steps, after the last step
        out["phases_s"] = {"start": begin - record["worker_start_s"], "steps": ends[-1] - begin,
                           "first_steps_to_short": ends[min(short, len(ends)) - 1] - begin,
                           "end": time.perf_counter() - ends[-1]}
    if str(short) in snaps and str(long) in snaps:
        (t0, r0), (t1, r1) = snaps[str(short)], snaps[str(long)]
        window = t1 - t0
        out["window_s_per_step"] = window / (long - short)
        cpu = record.get("cpu_at", {})
        out["window_cpu_s_per_step"] = (cpu[str(long)] - cpu[str(short)]) / (long - short)
        diff = {k: r1.get(k, 0.0) - r0.get(k, 0.0) for k in r1}
        if diff:
            out["profile_s_per_step"] = phase_profile(diff, window, long - short)
            out["profile_paths_s_per_step"] = {k: v / (long - short) for k, v in sorted(diff.items())}
    return out


# ---- workers ------------------------------------------------------------------------------------------
def worker_ours(a, record: dict) -> dict:
    os.environ["DLLM_CPU_THREADS"] = str(a.threads)
    from dllm_trainer.config import TrainConfig
    from dllm_trainer.training.train import leave_out_bitsandbytes

    raw = {
        "model_name": str(a.workload / "model"), "dataset_name": str(a.workload / "data.jsonl"),
        "output_dir": a.run_dir, "training_method": "llada", "train_device": a.device, "lora": False,
        "batch_size": a.batch_size, "max_length": a.max_length, "learning_rate": a.lr,
        "learning_rate_schedule": "constant", "eval_strategy": "no", "seed": a.seed,
        "num_train_epochs": 0, "train_steps": a.run_steps,
    }
    for kv in a.ours:
        k, _, v = kv.partition("=")
        raw[k.strip()] = v.strip()
    cfg = TrainConfig.from_dict(raw)
    leave_out_bitsandbytes(cfg)  # as our worker entry point does, before transformers' Trainer is imported

    import dllm_trainer.models.output_head as output_head
    import dllm_trainer.training.trainer as trainer_mod
    from dllm_trainer.models.llada import LLaDAModel, LLaDAModelLM
    from dllm_trainer.training.train import run_training

    regions, batches = Regions(), []
    instrument_trainer_class(regions, trainer_mod.MDLMTrainer, batches)
    for name in ("draw_masks", "packed_noise_and_weights"):
        if hasattr(trainer_mod, name):
            regions.patch(trainer_mod, name, "noise")
    regions.patch(LLaDAModelLM, "forward", "forward")
    regions.patch(output_head, "_head_and_ce", "head_ce")  # the generic chunked path
    if hasattr(output_head, "fused_linear_cross_entropy"):
        regions.patch(output_head, "fused_linear_cross_entropy", "head_ce")
    del LLaDAModel  # the head runs inside _head_and_ce here
    clock = make_step_clock(regions, a.short, a.long, record)
    result = run_training(cfg, log=lambda *x: None, extra_callbacks=[clock])
    import torch

    return {"config": {k: v for k, v in raw.items() if k not in ("output_dir",)}, "threads": torch.get_num_threads(),
            "batches": batches, "final_loss": result.metrics.get("loss"),
            "bitsandbytes_imported": sys.modules.get("bitsandbytes") is not None}


def _recipe_rows(workload: Path, tokenizer, max_length: int):
    """dllm's SFT rows: chat template over [user, assistant]; prompt = template of the user turn with the
    generation prompt, its labels -100; rows whose prompt exceeds max_length dropped; right-truncated."""
    import datasets

    ds = datasets.load_dataset("json", data_files=str(workload / "data.jsonl"), split="train")

    def ids(messages, **kw):
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)
        return list(out["input_ids"])

    def to_row(r):
        msgs = [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]
        full = ids(msgs, add_generation_prompt=False)
        n = len(ids(msgs[:1], add_generation_prompt=True))
        return {"input_ids": full[:max_length], "labels": ([-100] * n + full[n:])[:max_length], "prompt_len": n}

    ds = ds.map(to_row, remove_columns=ds.column_names)
    ds = ds.filter(lambda r: r["prompt_len"] <= max_length)
    return ds.remove_columns(["prompt_len"])


def worker_recipe(a, record: dict) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import AutoModel, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    import dllm_trainer.models  # noqa: F401 - registers our LLaDA implementation with AutoModel
    from dllm_trainer.models.llada import LLaDAModel, LLaDAModelLM

    torch.set_num_threads(a.threads)
    regions, batches = Regions(), []
    eps = 1e-3

    def check_t(t):  # dllm's scheduler validates t on every alpha / alpha' evaluation
        if not bool(torch.all((t >= 0) & (t <= 1))):
            raise ValueError("t out of [0, 1]")
        return t

    class RecipeTrainer(Trainer):
        """dllm MDLMTrainer.compute_loss semantics (linear schedule, scheduler weights, token norm)."""

        mask_token_id: int = -1
        meter = None

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            input_ids, labels = inputs["input_ids"], inputs["labels"]
            b, l = input_ids.shape
            maskable = labels != -100

            def noise():
                t = eps + (1 - eps) * torch.rand(b, device=input_ids.device)
                p_mask = 1.0 - (1.0 - check_t(t))[:, None].expand(b, l)  # 1 - alpha(t), alpha = 1 - t
                masked = (torch.rand((b, l), device=input_ids.device) < p_mask) & maskable
                return t, masked, torch.where(masked, self.mask_token_id, input_ids)

            t, masked, noised = regions.wrap("noise", noise)()
            out = model(input_ids=noised, attention_mask=inputs.get("attention_mask"))
            logits = out.logits  # [b, l, V] float32: the head at every position
            # w(t) = -alpha'(t) / (1 - alpha(t) + 1e-6) = 1 / (t + 1e-6), one weight per row
            weights = (1.0 / (1.0 - (1.0 - check_t(check_t(t))) + 1e-6)).unsqueeze(1).repeat(1, l)
            if not bool((input_ids[maskable] == labels[maskable]).all()):
                raise AssertionError("input_ids and labels differ at trainable positions")

            def ce():
                return F.cross_entropy(logits.transpose(1, 2), input_ids, reduction="none")

            nll = regions.wrap("head_ce", ce)()
            nll = nll * weights * masked.to(nll.dtype)
            # dllm's train NLL meter (torchmetrics MeanMetric: NaN check, then weighted sums)
            value, weight = nll.detach(), maskable.to(logits.dtype)
            if bool(torch.isnan(value).any()):
                raise ValueError("NaN in the loss")
            self.meter = (value * weight).sum() + (0 if self.meter is None else self.meter)
            nll = nll / maskable.sum().clamp_min(1)
            loss = nll.sum()
            return (loss, out) if return_outputs else loss

    instrument_trainer_class(regions, RecipeTrainer, batches)
    regions.patch(LLaDAModelLM, "forward", "forward")
    regions.patch(LLaDAModel, "head", "head_ce")

    model_dir = a.workload / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="right")
    gpu = a.device == "cuda"  # dllm's GPU defaults: weights in bfloat16 (ModelArguments.dtype), bf16=True
    model = AutoModel.from_pretrained(model_dir, dtype=torch.bfloat16 if gpu else torch.float32)
    train = _recipe_rows(a.workload, tokenizer, a.max_length)
    base = DataCollatorForSeq2Seq(tokenizer, return_tensors="pt", padding=True,
                                  label_pad_token_id=tokenizer.pad_token_id)  # trains on the EOS padding

    def collate(features):
        out = base(features)
        out.pop("attention_mask", None)  # the EOS padding is attended
        return out

    args = TrainingArguments(
        output_dir=a.run_dir, per_device_train_batch_size=a.batch_size, learning_rate=a.lr,
        lr_scheduler_type="constant", max_steps=a.run_steps, seed=a.seed, report_to=[], use_cpu=not gpu, bf16=gpu,
        eval_strategy="no", train_sampling_strategy="random",
        # dllm's TrainingArguments defaults: log every 10 steps, save the model every 10% of the run
        logging_steps=10, save_strategy="steps", save_steps=0.1, save_only_model=True, disable_tqdm=True,
    )
    trainer = RecipeTrainer(model=model, args=args, train_dataset=train, data_collator=collate,
                            processing_class=tokenizer,
                            callbacks=[make_step_clock(regions, a.short, a.long, record)])
    trainer.mask_token_id = int(tokenizer.mask_token_id)
    trainer.train()
    trainer.save_model(os.path.join(a.run_dir, "checkpoint-final"))
    return {"threads": torch.get_num_threads(), "rows": len(train), "batches": batches}


def worker_dllm(a, record: dict) -> dict:
    """Runs dllm's examples/llada/sft.py unmodified (run by DLLM_PYTHON with dllm importable)."""
    import runpy

    import torch

    src = Path(os.environ["DLLM_SRC"]).resolve()
    sys.path.insert(0, str(src))
    torch.set_num_threads(a.threads)
    data_dir = Path(a.run_dir) / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(a.workload / "data.jsonl") as fin, open(data_dir / "train.jsonl", "w") as fout:
        for line in fin:
            if line.strip():
                r = json.loads(line)
                fout.write(json.dumps({"messages": [{"role": "user", "content": r["prompt"]},
                                                    {"role": "assistant", "content": r["completion"]}]}) + "\n")
    if not torch.cuda.is_available():
        # CPU shim: dllm's LLaDAModelLM builds its modules with init_device="cuda" unconditionally.
        import dllm.pipelines.llada.models.modeling_llada as modeling

        orig_init = modeling.LLaDAModel.__init__

        def cpu_init(self, config, *args, **kwargs):
            if config.init_device == "cuda":
                config.init_device = "cpu"
            orig_init(self, config, *args, **kwargs)

        modeling.LLaDAModel.__init__ = cpu_init
    import transformers

    regions = Regions()
    orig_trainer_init = transformers.Trainer.__init__

    def trainer_init(self, *args, **kwargs):
        orig_trainer_init(self, *args, **kwargs)
        self.add_callback(make_step_clock(regions, a.short, a.long, record))

    transformers.Trainer.__init__ = trainer_init
    sys.argv = [str(src / DLLM_SFT),
                "--model_name_or_path", str(a.workload / "model"), "--dataset_args", str(data_dir),
                "--output_dir", str(Path(a.run_dir) / "out"), "--max_length", str(a.max_length),
                "--per_device_train_batch_size", str(a.batch_size), "--learning_rate", str(a.lr),
                "--lr_scheduler_type", "constant", "--max_steps", str(a.run_steps), "--seed", str(a.seed),
                "--eval_strategy", "no", "--group_by_length", "False",
                "--report_to", "none", "--num_proc", "1", "--disable_tqdm", "True"]
    if a.device == "cpu":  # on a GPU: dllm's defaults (bfloat16 weights, bf16=True)
        sys.argv += ["--bf16", "False", "--dtype", "float32", "--use_cpu", "True"]
    runpy.run_path(str(src / DLLM_SFT), run_name="__main__")
    return {"threads": torch.get_num_threads(), "dllm_src": str(src), "transformers": transformers.__version__,
            "argv": sys.argv[1:]}


def worker_main(argv) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", choices=SIDES, required=True)
    ap.add_argument("--workload", type=Path, required=True)
    ap.add_argument("--run-steps", type=int, required=True)
    ap.add_argument("--short", type=int, required=True)
    ap.add_argument("--long", type=int, required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--batch-size", type=int, required=True)
    ap.add_argument("--max-length", type=int, required=True)
    ap.add_argument("--lr", type=float, required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--ours", action="append", default=[])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--result", required=True)
    a = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    record: dict = {"worker_start_s": time.perf_counter()}
    fn = {"ours": worker_ours, "dllm-recipe": worker_recipe, "dllm": worker_dllm}[a.worker]
    extra = fn(a, record)
    res = {**extra, **summarise_record(record, a.short, a.long)}
    if a.device == "cuda":
        import torch

        res["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    with open(a.result, "w") as fh:
        json.dump(res, fh)
    return 0


# ---- driver ---------------------------------------------------------------------------------------------
def run_one(a, side: str, steps: int, workdir: Path) -> dict:
    """One run in a fresh process: wall seconds, peak RSS (ru_maxrss of that process) and its record."""
    run_dir = workdir / f"{side}-{steps}"
    run_dir.mkdir(parents=True)
    python = os.environ.get("DLLM_PYTHON", sys.executable) if side == "dllm" else sys.executable
    cmd = [python, str(Path(__file__).resolve()), "--worker", side, "--workload", str(a.workload),
           "--run-steps", str(steps), "--short", str(a.short), "--long", str(a.long), "--threads", str(a.threads),
           "--batch-size", str(a.batch_size), "--max-length", str(a.max_length), "--lr", str(a.lr),
           "--seed", str(a.seed), "--device", a.device, "--run-dir", str(run_dir / "run"),
           "--result", str(run_dir / "result.json")]
    for kv in a.ours:
        cmd += ["--ours", kv]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), TOKENIZERS_PARALLELISM="false",
               HF_DATASETS_DISABLE_PROGRESS_BARS="1", PYTHONUNBUFFERED="1", HF_DATASETS_CACHE=str(run_dir / "hf_cache"))
    # (each run its own datasets cache: a cache shared by the LONG and SHORT runs made the second
    # one skip tokenising and caching, which the difference then charged to the steps)
    if side == "ours":
        env.update(a.ours_env)
    if side == "dllm":
        env["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ["DLLM_SRC"], env.get("PYTHONPATH")) if p)
    log = run_dir / "log.txt"
    with open(log, "w") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(run_dir))
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 or not (run_dir / "result.json").is_file():
        sys.stderr.write(log.read_text()[-6000:])
        raise SystemExit(f"the {side} run of {steps} steps failed (exit {proc.returncode}); log above")
    res = json.loads((run_dir / "result.json").read_text())
    if res.get("global_step") != steps:
        raise SystemExit(f"the {side} run trained {res.get('global_step')} steps, not {steps}")
    return {"steps": steps, "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_mib": usage.ru_maxrss / 1024, **res}


KEPT_WORKER_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def launcher_env(a) -> dict[str, str]:
    """What dllm_trainer's launcher sets for a one-process CPU job (bar the thread count, set for all)."""
    sys.path.insert(0, str(ROOT / "src"))
    from dllm_trainer.config import TrainConfig
    from dllm_trainer.training.launcher import build_launch

    cfg = TrainConfig.from_dict({"model_name": str(a.workload / "model"), "dataset_name": str(a.workload / "data.jsonl"),
                                 "training_method": "llada", "train_device": "cpu"})
    base = {"OMP_NUM_THREADS": str(a.threads), "DLLM_CPU_THREADS": str(a.threads)}
    # the launcher keeps a user's own settings (an empty OMP_WAIT_POLICY: libgomp's default)
    base.update({k: v for k, v in os.environ.items() if k in KEPT_WORKER_SETTINGS})
    env = build_launch(cfg, "unused.json", base_env=base).env
    return {k: v for k, v in env.items() if v is not None and k not in ("OMP_NUM_THREADS", "DLLM_CPU_THREADS")}


def _median_of(runs, key):
    vals = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def side_summary(runs: list[dict], short: int, long: int) -> dict:
    """Median over rounds of (wall(long) - wall(short)) / (long - short); peak RSS of the long runs."""
    by = defaultdict(list)
    for r in runs:
        by[r["steps"]].append(r)
    diffs = [(l["wall_s"] - s["wall_s"]) / (long - short) for l, s in zip(by[long], by[short])]
    cpu = [(l["cpu_s"] - s["cpu_s"]) / (long - short) for l, s in zip(by[long], by[short])]
    out = {
        "s_per_step": statistics.median(diffs),
        "s_per_step_rounds": diffs,
        # CPU seconds (user + system) of the process per step, same difference: less sensitive to
        # other load than wall time with one thread (with more threads it counts OpenMP spinning)
        "cpu_s_per_step": statistics.median(cpu),
        "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in by[long]),
        "peak_rss_mib_short_run": statistics.median(r["peak_rss_mib"] for r in by[short]),
        "window_s_per_step": _median_of(by[long], "window_s_per_step"),
        "window_cpu_s_per_step": _median_of(by[long], "window_cpu_s_per_step"),
    }
    profs = [r["profile_s_per_step"] for r in by[long] if "profile_s_per_step" in r]
    if profs:
        out["profile_s_per_step"] = {k: statistics.median(p[k] for p in profs) for k in profs[0]}
    if any("peak_gpu_mib" in r for r in by[long]):
        out["peak_gpu_mib"] = _median_of(by[long], "peak_gpu_mib")
    batches = [b for r in by[long] for b in r.get("batches", [])[short:long]]
    if batches:
        out["tokens_computed_per_step"] = statistics.mean(b["shape"][0] * b["shape"][1] for b in batches)
        out["trainable_tokens_per_step"] = statistics.mean(b["trainable"] for b in batches)
    return out


def model_flops_utilization(n_params: int, positions_per_step: float, s_per_step: float, peak_tflops: float) -> float:
    """6 * N * positions FLOPs per step (forward 2N + backward 4N per position) over the peak."""
    return 6.0 * n_params * positions_per_step / s_per_step / (peak_tflops * 1e12)


def count_parameters(model_dir: Path) -> int:
    """Parameters of a safetensors checkpoint (model.safetensors or its shards), from the headers."""
    import math

    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({model_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = [model_dir / "model.safetensors"]
    total = 0
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                total += math.prod(st.get_slice(name).get_shape())
    return total


def main(argv) -> int:
    if argv and argv[0] == "--worker" or "--worker" in argv:
        return worker_main(argv)
    ap = argparse.ArgumentParser(prog="bench_train.py WORKLOAD --baseline dllm-recipe",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("workload", help="a folder written by make_workload.py (generated first when missing)")
    ap.add_argument("--baseline", choices=["dllm-recipe"], required=True)
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary of a workload generated here (default: the generator's, 4096)")
    ap.add_argument("--steps", default="100,50", help="LONG,SHORT: s/step = wall difference / (LONG - SHORT)")
    ap.add_argument("--repeats", type=int, default=1, help="rounds of all runs (ABBA order); medians")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads for EVERY run, both sides (0: dllm_trainer's default_cpu_threads(), chosen once)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--ours", action="append", default=[], metavar="KEY=VALUE",
                    help="override one of our config fields (e.g. pack_sequences=true); repeatable")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cuda: every side on GPU 0 in its GPU defaults (bf16); memory = peak GPU memory; adds MFU")
    ap.add_argument("--peak-tflops", type=float, default=989.0,
                    help="the GPU's peak dense TFLOP/s in the training dtype, for MFU (H100/H200 bf16: 989)")
    ap.add_argument("--no-dllm", action="store_true", help="skip the real dllm run even when DLLM_SRC is set")
    ap.add_argument("--keep", action="store_true", help="keep the runs' output folders and logs")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "train_side_by_side.json"))
    a = ap.parse_args(argv)
    try:
        a.long, a.short = (int(x) for x in a.steps.split(","))
    except ValueError:
        ap.error(f"--steps must be LONG,SHORT (e.g. 100,50), got {a.steps!r}")
    if not 0 < a.short < a.long:
        ap.error(f"--steps LONG,SHORT needs 0 < SHORT < LONG, got {a.steps!r}")
    if a.repeats < 1:
        ap.error("--repeats must be at least 1")
    for kv in a.ours:
        if "=" not in kv:
            ap.error(f"--ours takes KEY=VALUE, got {kv!r}")
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: this machine has no CUDA device torch can use")
    dllm_src = os.environ.get("DLLM_SRC", "").strip()
    sides = ["ours", "dllm-recipe"]
    if dllm_src and not a.no_dllm:
        if not (Path(dllm_src) / DLLM_SFT).is_file():
            raise SystemExit(f"DLLM_SRC={dllm_src} is not a dllm checkout (no {DLLM_SFT})")
        sides.append("dllm")
    a.workload = resolve_workload(a.workload, a.vocab)
    if not a.threads:
        sys.path.insert(0, str(ROOT / "src"))
        from dllm_trainer.training.cpu import default_cpu_threads

        a.threads = default_cpu_threads()

    # Ours runs in the environment our launcher gives a CPU worker (e.g. passive OpenMP waits).
    a.ours_env = launcher_env(a) if a.device == "cpu" else {}  # the launcher sets these for CPU workers only
    wl = workload_summary(a.workload)
    print(f"workload {wl['path']}: vocab {wl['vocab_size']}, d_model {wl['d_model']}, {wl['n_layers']} layers, "
          f"{wl['rows']} rows", flush=True)
    print(f"settings: batch {a.batch_size}, max_length {a.max_length}, lr {a.lr:g} constant, eval off, seed {a.seed}, "
          f"{'bf16 GPU' if a.device == 'cuda' else 'fp32 CPU'}, {a.threads} torch thread(s) in every run; "
          f"runs of {a.long} and {a.short} steps, "
          f"{a.repeats} round(s); our overrides: {', '.join(a.ours) or 'none'}; our worker environment: "
          f"{' '.join(f'{k}={v}' for k, v in sorted(a.ours_env.items()))}", flush=True)
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="bench_side_"))
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    try:
        for r in range(a.repeats):
            order = [(s, n) for n in (a.long, a.short) for s in sides]
            for side, n in order if r % 2 == 0 else list(reversed(order)):
                res = run_one(a, side, n, workdir / f"round{r}")
                runs[side].append(res)
                print(f"[round {r + 1}/{a.repeats}] {side:12s} {n:4d} steps {res['wall_s']:8.1f} s  "
                      f"peak RSS {res['peak_rss_mib']:7.0f} MiB", flush=True)
    finally:
        if a.keep:
            print(f"runs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    summary = {s: side_summary(runs[s], a.short, a.long) for s in sides}
    ours = summary["ours"]
    ratios = {}
    memory = "peak_gpu_mib" if a.device == "cuda" else "peak_rss_mib"
    for s in sides[1:]:
        key = "dllm_recipe" if s == "dllm-recipe" else "dllm"
        ratios[f"speedup_vs_{key}"] = summary[s]["s_per_step"] / ours["s_per_step"]
        ratios[f"memory_ratio_vs_{key}"] = ours[memory] / summary[s][memory]
    # the same ratios from CPU seconds (user + system) per step: on a loaded machine with one thread
    # per run a steadier figure than wall time; reported beside, never instead
    cpu_ratios = {f"cpu_speedup_vs_{'dllm_recipe' if s == 'dllm-recipe' else 'dllm'}":
                  summary[s]["cpu_s_per_step"] / ours["cpu_s_per_step"] for s in sides[1:]}

    if a.device == "cuda":
        n_params = count_parameters(a.workload / "model")
        for s in sides:
            if "tokens_computed_per_step" in summary[s]:
                summary[s]["mfu"] = model_flops_utilization(n_params, summary[s]["tokens_computed_per_step"],
                                                            summary[s]["s_per_step"], a.peak_tflops)

    print()
    names = {"ours": "ours (llada)", "dllm-recipe": "dllm-recipe", "dllm": "dllm (real)"}
    for s in sides:
        x = summary[s]
        toks = (f"  tokens/step computed {x['tokens_computed_per_step']:.0f}, trainable {x['trainable_tokens_per_step']:.0f}"
                if "tokens_computed_per_step" in x else "")
        gpu = (f"  peak GPU memory {x['peak_gpu_mib']:.0f} MiB" if "peak_gpu_mib" in x else "") + (
            f"  MFU {x['mfu']:.3f}" if "mfu" in x else "")
        print(f"{names[s]:13s} {x['s_per_step']:.3f} s/step (window {x['window_s_per_step'] or float('nan'):.3f}, "
              f"cpu {x['cpu_s_per_step']:.3f})  "
              f"peak RSS {x['peak_rss_mib']:.0f} MiB{gpu}{toks}")
    for s in ("ours", "dllm-recipe"):
        p = summary[s].get("profile_s_per_step")
        if p:
            print(f"profile {s} (s/step, steps {a.short + 1}-{a.long}): "
                  + "  ".join(f"{k} {p[k]:.4f}" for k in PROFILE_PHASES))
    out = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "command": " ".join([os.path.relpath(sys.executable, ROOT), "bench/bench_train.py", *argv]),
        "workload": wl,
        "summary": summary,
        **ratios,
        **cpu_ratios,
        "runs": runs,
        "wall_s": time.perf_counter() - started,
        "host": {"cpu_count": os.cpu_count(), "load_avg_at_end": os.getloadavg()},
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump(out, fh, indent=2)
    print(f"wrote {a.out} ({out['wall_s']:.0f} s)")
    print("from CPU seconds per step: " + " ".join(f"{k}={v:.2f}" for k, v in cpu_ratios.items()))
    print(" ".join(f"{k}={v:.2f}" for k, v in ratios.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
