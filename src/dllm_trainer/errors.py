"""User-facing errors: each is shown as one clear message, never as a traceback."""


class UserError(Exception):
    """An error caused by the user's input: shown as one clear message, never a traceback."""


class ConfigError(UserError):
    """An invalid config value; the message names the field and what is allowed."""


class DataError(UserError):
    """A dataset that cannot be used; the message names the dataset/file and what is wrong."""


class ModelError(UserError):
    """A model that cannot be used; the message names the model and what is wrong."""


ERROR_PREFIX = "[dllm-error] "


def report_user_error(e: BaseException) -> int:
    """Print one clear line (no traceback) and return the exit code for a user error."""
    import sys

    print(f"{ERROR_PREFIX}{e}", file=sys.stderr, flush=True)
    return 2


def report_unexpected_error(e: BaseException, debug_dir: str | None) -> int:
    """An internal error: one line on the console, the traceback in <debug_dir>/debug.log."""
    import os
    import sys
    import traceback

    where = ""
    if debug_dir:
        try:
            os.makedirs(debug_dir, exist_ok=True)
            path = os.path.join(debug_dir, "debug.log")
            with open(path, "a", encoding="utf-8") as fh:
                traceback.print_exception(e, file=fh)
            where = f" (traceback in {path})"
        except OSError:
            pass
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    print(f"{ERROR_PREFIX}unexpected {type(e).__name__}: {msg}{where}", file=sys.stderr, flush=True)
    return 1
