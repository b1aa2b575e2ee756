"""Trainer callbacks shared by every way of running a job.

Workers talk to the launching process through their output stream and the file system only, so
the Transformer Lab SDK never has to be imported inside a worker (the protocol: events.py):

- progress, metrics and checkpoints are `[dllm-event]` JSON lines when the process is a launched
  worker (the launcher turns each into one human line); run in-process, the same callback prints
  the human line itself;
- HF's own progress callback is replaced by `ConsoleProgressCallback`: the same bars, without
  HF printing every log dict beside our line;
- a stop request is a file, `<output_dir>/STOP`, that the launcher (or Ctrl-C in-process)
  writes; every worker checks it at each step, so all ranks stop at the same step and save one
  checkpoint. Under a host that stops jobs by sending SIGTERM to every process (the current
  Transformer Lab), the launcher sets STOP_ON_SIGTERM_ENV and that signal is a stop request too.
"""
from __future__ import annotations

import os
import signal
import threading

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from .events import (  # noqa: F401
    EVENT_PREFIX, STOP_FILE, STOP_ON_SIGTERM_ENV, describe_metrics, emit_event, events_enabled, parse_event,
)

_signalled = threading.Event()


def stop_on_sigterm() -> None:
    """SIGTERM becomes a stop request (checked at the next step end) instead of ending the worker."""
    try:
        signal.signal(signal.SIGTERM, lambda signum, frame: _signalled.set())
    except ValueError:  # not the main thread (e.g. TPU processes): the STOP file still works
        pass


class EventCallback(TrainerCallback):
    """Progress and metrics, from the main process only: events for the launcher, or (run
    in-process) one printed line per logging step and checkpoint."""

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            if events_enabled():
                emit_event("train_begin", max_steps=state.max_steps)
            else:
                _write(f"[dllm] training started: {state.max_steps} optimizer steps")

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and events_enabled():
            emit_event("progress", step=state.global_step, max_steps=state.max_steps)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            scalars = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float))}
            if events_enabled():
                emit_event("metrics", step=state.global_step, **scalars)
            else:
                _write(describe_metrics(scalars, state.global_step, state.max_steps))

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            if events_enabled():
                emit_event("checkpoint", step=state.global_step, path=path)
            else:
                _write(f"[dllm] checkpoint saved: {path}")


def _write(line: str) -> None:
    """A line above the progress bar (tqdm.write keeps a bar that redraws in place intact)."""
    from tqdm.auto import tqdm

    tqdm.write(line)


class ConsoleProgressCallback(ProgressCallback):
    """HF's progress bars without HF's log-dict lines (EventCallback writes one line per log).

    The evaluation bar takes the training bar's line while it runs (leave=False) instead of a
    second line below it: nested bars move the cursor up, which a relayed log cannot show."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if state.is_world_process_zero and self.prediction_bar is None and eval_dataloader is not None:
            from tqdm.auto import tqdm

            try:
                total = len(eval_dataloader)
            except TypeError:
                total = None
            self.prediction_bar = tqdm(total=total, leave=False, position=0, dynamic_ncols=True, desc="evaluating")
        if state.is_world_process_zero and self.prediction_bar is not None:
            self.prediction_bar.update(1)


class StopFileCallback(TrainerCallback):
    """Stops cleanly (with a checkpoint) when <output_dir>/STOP appears (written by the launcher
    for the app's Stop button or Ctrl-C, by Ctrl-C in-process, or by hand)."""

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
            control.should_evaluate = False  # a stop saves and ends; nothing else runs
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

    def __init__(self, prompts: list[str], tokenizer, *, every: int, gen_length: int, steps: int, log_dir: str,
                 stopper: "StopFileCallback | None" = None):
        self.stopper = stopper  # after a stop request nothing more runs (no samples either)
        self.prompts = prompts
        self.tokenizer = tokenizer
        self.every = every
        self.gen_length = gen_length
        self.steps = steps
        self.log_dir = log_dir
        self._writer = None
        self.history: list[tuple[int, str, str]] = []

    def _stopping(self) -> bool:
        return self.stopper is not None and self.stopper.stopped

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every and state.global_step % self.every == 0 and not self._stopping():
            self._sample(state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if (not self.history or self.history[-1][0] != state.global_step) and not self._stopping():
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
