"""How training workers talk to the process that launched them, and what a person reads.

Imports nothing heavy (no torch, no transformers): the launcher side uses it too.

- Events: one-line JSON (`[dllm-event] {...}`) on a worker's stdout, parsed by the launcher
  (launcher.py), which prints a human line for each and never relays the JSON. Only a process
  that runs as a launched worker (`python -m dllm_trainer.training.train`, which calls
  `enable_events()`) prints events; `run_training` called in-process (the demo, a notebook)
  prints the human lines itself.
- Stop: the file `<output_dir>/STOP`; every worker checks it at the end of each step.
- `describe_metrics`: the one line a logging step gets, in both cases.
"""
from __future__ import annotations

import json
import math

EVENT_PREFIX = "[dllm-event] "
STOP_FILE = "STOP"
STOP_ON_SIGTERM_ENV = "DLLM_STOP_ON_SIGTERM"  # set by the launcher: SIGTERM is a stop request (callbacks.py)

_events = False


def enable_events(on: bool = True) -> None:
    global _events
    _events = on


def events_enabled() -> bool:
    return _events


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


# (key, label) in the order shown; every other key of a log entry stays in TensorBoard / metrics.json
_TRAIN_KEYS = (("loss", "loss"), ("masked_accuracy", "masked acc"), ("grad_norm", "grad norm"),
               ("learning_rate", "lr"), ("tokens_per_second", "tok/s"), ("epoch", "epoch"))
_EVAL_KEYS = (("eval_loss", "eval loss"), ("eval_masked_accuracy", "eval masked acc"),
              ("eval_nll_bound", "eval NLL bound"), ("eval_perplexity_bound", "eval ppl bound"))


def _num(v) -> str:
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.3g}" if abs(v) < 1e-2 and v != 0 else f"{v:.4g}"
    return str(v)


def describe_metrics(logs: dict, step, max_steps=None) -> str:
    """One readable line for one logging step (training, evaluation, or the end-of-training summary)."""
    of = f"/{max_steps}" if max_steps else ""
    if "train_runtime" in logs:
        loss = logs.get("train_loss")
        mean = f", mean loss {_num(loss)}" if isinstance(loss, (int, float)) and loss is not None else ""
        return f"[dllm] training finished at step {step}{of} in {_num(float(logs['train_runtime']))} s{mean}"
    keys = _EVAL_KEYS if any(k.startswith("eval_") for k in logs) else _TRAIN_KEYS
    shown = [f"{label} {_num(logs[k])}" for k, label in keys if logs.get(k) is not None]
    what = "eval" if keys is _EVAL_KEYS else "step"
    if what == "eval":
        return f"[dllm] eval at step {step}{of}: " + ", ".join(shown)
    return f"[dllm] step {step}{of}: " + ", ".join(shown)


class CtrlCStops:
    """Ctrl-C stops like the STOP file: the first SIGINT calls `on_first()` (which writes the STOP
    file) and training goes on to the end of the step in progress, saves a checkpoint and stops;
    a second SIGINT raises KeyboardInterrupt (stop at once). Only in the main thread (signal
    handlers cannot be installed elsewhere); the previous handler is restored on exit."""

    def __init__(self, on_first):
        self.on_first = on_first
        self.pressed = 0
        self._previous = None

    def _handler(self, signum, frame):
        self.pressed += 1
        if self.pressed > 1:
            raise KeyboardInterrupt
        self.on_first()

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            try:
                self._previous = signal.signal(signal.SIGINT, self._handler)
            except (ValueError, OSError):
                self._previous = None
        return self

    def __exit__(self, *exc):
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
        return False
