"""`dllm-trainer`: the standalone command line.

    dllm-trainer train --config job.json [--set key=value ...]   run a training job (no app needed)
    dllm-trainer generate --model PATH --prompt TEXT              sample from a model
    dllm-trainer chat --model PATH                                interactive chat (:complete N, :mask R)
    dllm-trainer playground --model PATH                          web page: chat/infill, watch it denoise
    dllm-trainer eval --model PATH --tasks T[,T...]               lm-evaluation-harness tasks (ELBO + samplers)
    dllm-trainer demo                                             the bundled CPU demo
    dllm-trainer manifest [--manifest index.json] [--task-yaml task.yaml]   the app forms, from config.py
    dllm-trainer memory-plan --config job.json [--gpus N]          estimated peak GPU memory of a job (--readme: 8B table)

`dllm-trainer COMMAND --help` describes a command. Stopping a training run: Ctrl-C (or creating
<output_dir>/STOP) stops after the step in progress and saves a checkpoint; a second Ctrl-C stops at once.
"""
from __future__ import annotations

import sys

COMMANDS = ("train", "generate", "chat", "playground", "eval", "demo", "manifest", "memory-plan")


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(sys.argv[1:] if argv is None else list(argv))
    except KeyboardInterrupt:  # Ctrl-C at any moment (also while torch is imported): no traceback
        print("[dllm] interrupted", file=sys.stderr, flush=True)
        return 130


def _main(argv: list[str]) -> int:
    # This module and the ones it imports before a command runs import neither torch nor transformers.
    from . import _stop_auto_registration

    _stop_auto_registration()  # every command registers LLaDA/Dream where it loads one
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "train":
        from .app import main as app_main

        return app_main(rest, prog="dllm-trainer train")
    if cmd in ("generate", "chat"):
        from .sampling.chat import main as chat_main

        return chat_main([cmd, *rest])
    if cmd == "playground":
        from .sampling.playground import main as playground_main

        return playground_main(rest)
    if cmd == "eval":
        from .evaluation.lm_eval_model import main as eval_main

        return eval_main(rest)
    if cmd == "demo":
        from .demo import main as demo_main

        return demo_main(rest)
    if cmd == "memory-plan":
        from .training.memory_plan import main as plan_main

        return plan_main(rest)
    if cmd == "manifest":
        from .config import _main as manifest_main

        return manifest_main(rest)
    print(f"dllm-trainer: unknown command '{cmd}' (allowed: {', '.join(COMMANDS)})", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
