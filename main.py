"""Diffusion LLM Trainer: the entry point inside Transformer Lab and standalone.

Transformer Lab v0.30.x's plugin harness puts this folder on sys.path, imports this module and calls
`main()`; the harness's own arguments (--plugin_dir, --input_file, --experiment_name, ...) are in
sys.argv. The current Transformer Lab runs `python main.py` as a task (task.yaml), the job named in
the environment. Standalone:

    python main.py --config job.json [--set key=value ...]

Importing this module does nothing else; all the work lives in `dllm_trainer.app`.
"""
import os
import sys


def _package_on_path() -> None:
    """Make `dllm_trainer` importable from this folder's src/ even when it is not installed."""
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "src")
    if os.path.isdir(os.path.join(src, "dllm_trainer")) and src not in sys.path:
        sys.path.insert(0, src)


def main(argv=None) -> int:
    """Run one job; exits with a non-zero status when it fails (the harness ignores return values)."""
    try:
        _package_on_path()
        from dllm_trainer.app import main as run

        code = run(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt:  # Ctrl-C while Python imports: no traceback either
        print("[dllm] interrupted", file=sys.stderr, flush=True)
        code = 130
    if code:
        sys.exit(code)
    return 0


if __name__ == "__main__":
    main()
