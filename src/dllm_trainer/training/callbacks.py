"""Trainer callbacks shared by every way of running a job.

Workers talk to the launching process through their output stream and the file system only, so
the Transformer Lab SDK never has to be imported inside a worker:

- progress and metrics are printed as one-line JSON events (`[dllm-event] {...}`), which the
  launcher parses from the stream (and a human reads in the live log);
- a stop request is a file, `<output_dir>/STOP`, that the launcher writes; every worker checks it
  at each step, so all ranks stop at the same step and save one checkpoint. Under a host that stops
  jobs by sending SIGTERM to every process (the current Transformer Lab), the launcher sets
  STOP_ON_SIGTERM_ENV and that signal is a stop request too.
"""
from __future__ import annotations

import json
import math
import os
import signal
import threading

from transformers import TrainerCallback

EVENT_PREFIX = "[dllm-event] "
STOP_FILE = "STOP"
STOP_ON_SIGTERM_ENV = "DLLM_STOP_ON_SIGTERM"
_signalled = threading.Event()


def stop_on_sigterm() -> None:
    """SIGTERM becomes a stop request (checked at the next step end) instead of ending the worker."""
    try:
        signal.signal(signal.SIGTERM, lambda signum, frame: _signalled.set())
    except ValueError:  # not the main thread (e.g. TPU processes): the STOP file still works
        pass


def emit_event(kind: str, **payload) -> None:
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in payload.items()}
    print(EVENT_PREFIX + json.dumps({"event": kind, **clean}), flush=True)


def parse_event(line: str) -> dict | None:
    if not line.startswith(EVENT_PREFIX):
        return None
    try:
        ev = json.loads(line[len(EVENT_PREFIX):])
    except json.JSONDecodeError:
        return None
    return ev if isinstance(ev, dict) and "event" in ev else None


class EventCallback(TrainerCallback):
    """Progress and metrics as events, from the main process only."""

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            emit_event("train_begin", max_steps=state.max_steps)

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            emit_event("progress", step=state.global_step, max_steps=state.max_steps)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            scalars = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float))}
            emit_event("metrics", step=state.global_step, **scalars)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            emit_event("checkpoint", step=state.global_step, path=os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))


class StopFileCallback(TrainerCallback):
    """Stops cleanly (with a checkpoint) when the launcher writes <output_dir>/STOP."""

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, STOP_FILE)
        self.stopped = False

    def on_step_end(self, args, state, control, **kwargs):
        # Every rank must stop at the same step (a rank that runs one more step would wait forever
        # in its collectives): the file check is OR-reduced over all ranks.
        if _any_rank(os.path.exists(self.path) or _signalled.is_set(), args):
            self.stopped = True
            control.should_training_stop = True
            control.should_save = True
        return control


def _any_rank(flag: bool, args) -> bool:
    """flag OR-ed over every distributed rank (the flag itself when not distributed)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=args.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class SampleCallback(TrainerCallback):
    """Generates from the configured prompts every N steps (and at the end) on every worker.

    Every rank runs the sampler (no rank-0-only forward that could deadlock a sharded model);
    rank 0 prints the text and writes it to TensorBoard.
    """

    def __init__(self, prompts: list[str], tokenizer, *, every: int, gen_length: int, steps: int, log_dir: str):
        self.prompts = prompts
        self.tokenizer = tokenizer
        self.every = every
        self.gen_length = gen_length
        self.steps = steps
        self.log_dir = log_dir
        self._writer = None
        self.history: list[tuple[int, str, str]] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every and state.global_step % self.every == 0:
            self._sample(state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not self.history or self.history[-1][0] != state.global_step:
            self._sample(state, model)

    def _sample(self, state, model):
        import torch

        from ..sampling import generate

        was_training = model.training
        model.eval()
        try:
            for prompt in self.prompts:
                ids = _encode_prompt(self.tokenizer, prompt)
                device = next(model.parameters()).device
                with torch.no_grad():
                    out = generate(model, torch.tensor([ids], device=device), gen_length=self.gen_length,
                                   steps=min(self.steps, self.gen_length))
                text = self.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip()
                self.history.append((state.global_step, prompt, text))
                if state.is_world_process_zero:
                    print(f"[dllm] sample @ step {state.global_step}: {prompt!r} -> {text!r}", flush=True)
                    self._tb().add_text("samples", f"**{prompt}**\n\n{text}", state.global_step)
        finally:
            if was_training:
                model.train()

    def _tb(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=self.log_dir)
        return self._writer


def _encode_prompt(tokenizer, prompt: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        enc = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)
        return list(enc["input_ids"])
    return tokenizer(prompt)["input_ids"]
