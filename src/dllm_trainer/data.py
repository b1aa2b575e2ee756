"""Data pipeline: load a dataset, detect its row format, render optional templates, tokenise, split.

Plain functions with explicit keyword arguments (no config object), so they can be used standalone::

    prepared = build_datasets("data.jsonl", tokenizer, max_length=512)
    prepared.train, prepared.eval, prepared.stats

Sources (``load_raw_dataset``)
    a folder written by ``datasets.save_to_disk`` (Dataset or DatasetDict); a folder of
    ``.json`` / ``.jsonl`` / ``.csv`` / ``.parquet`` files (a file named ``index.json``, which
    Transformer Lab writes beside uploaded data, is ignored; files whose name starts with
    ``test`` / ``validation`` / ``valid`` / ``val`` / ``dev`` / ``eval`` become the ``test`` /
    ``validation`` split, the rest ``train``); one such file; otherwise a Hugging Face Hub
    dataset id (``datasets.load_dataset(source, token=token)``).

Row formats (``detect_format``, first match wins)
    ``messages``           a ``messages`` column: a list of ``{"role", "content"}`` dicts
                           (a JSON string is accepted too). The LAST assistant message is the
                           response; everything before it is the prompt (earlier assistant turns
                           included); messages after it are ignored. No assistant turn -> dropped.
    ``prompt_completion``  ``prompt`` + ``completion`` (or ``response``). A list-of-messages
                           ``prompt`` (TRL conversational style) is accepted too.
    ``alpaca``             ``instruction`` + ``output`` (+ optional ``input``); the user prompt is
                           ``instruction`` or ``instruction + "\\n\\n" + input``.
    ``text``               ``text`` only: pretraining rows, no prompt, everything trainable.

Templates (as Transformer Lab trainers offer)
    ``input_template`` / ``output_template`` are Jinja strings rendered with the row's columns as
    variables in a sandbox (``jinja2.sandbox.ImmutableSandboxedEnvironment``, undefined variables
    are errors, ``None`` renders as ""). When given they override format detection: the rendered
    input is the user message and the rendered output the assistant response. An
    ``output_template`` alone renders a ``text`` row. ``instruction_template`` is a plain string
    used as the system message (not added when a ``messages`` row already starts with one;
    ignored for ``text`` rows).

Tokenisation (``tokenize_example``)
    With a chat template: ``prompt = apply_chat_template(messages before the response,
    add_generation_prompt=True)``, ``full = apply_chat_template(messages up to and including
    the response)``; ``input_ids = full`` and ``prompt_len = len(prompt)`` when ``prompt`` is a
    token prefix of ``full``. Otherwise (rare templates) the prompt ids are concatenated with the
    tokenised rest of the rendered text (or, if even the text is not a prefix, with
    ``response + eos``).

    Without a chat template, the PLAIN TEMPLATE::

        prompt_text = user content                       (one user message, no system message)
                    | "\\n".join(f"{role}: {content}") + "\\nassistant:"   (anything else: system
                                                           message and/or several turns)
        prompt_ids   = tokenizer(prompt_text)["input_ids"]             # the tokenizer's own special
                                                                        # tokens, e.g. BERT:
                                                                        # [CLS] prompt [SEP]
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [end]
        end          = eos_token_id, or sep_token_id when the tokenizer has no eos (BERT)
        input_ids    = prompt_ids + response_ids;  prompt_len = len(prompt_ids)

    ``text`` rows: ``input_ids = tokenizer(text)["input_ids"]`` (with the tokenizer's special
    tokens), plus ``end`` appended when the tokenizer did not already end the row with it;
    ``prompt_len`` = the number of leading BOS/CLS tokens (0 or 1).

    Labels: ``-100`` on the first ``prompt_len`` tokens when ``mask_prompt_loss``, else a copy
    of ``input_ids``. Truncation: ``"right"`` cuts the end at ``max_length``; ``"filter"`` drops
    rows longer than ``max_length``. Rows with no trainable label are dropped. Drop reasons:
    ``empty`` (no text / missing response), ``no_assistant_turn``, ``malformed`` (messages that
    are not a list of role/content dicts), ``too_long`` (filter mode), ``no_trainable_tokens``
    (e.g. the prompt fills ``max_length``).

Eval split (``build_datasets``)
    The dataset's own ``test`` (else ``validation``) split when present; otherwise, when the
    training split has at least 10 rows, ``ceil(eval_fraction * rows)`` raw rows chosen with
    ``numpy.random.default_rng(seed)`` (before tokenisation, so the held-out set does not depend
    on the tokenizer or ``max_length``); otherwise no eval split. Train keeps its file order.
    Each split then gets ``sample_index`` = 0..n-1 over its kept rows (it seeds per-sample noise).
"""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import datasets
import numpy as np
import pyarrow.compute as pc

from .errors import ConfigError, DataError

__all__ = [
    "FORMATS",
    "DATA_EXTENSIONS",
    "ASSETS_DIR",
    "DataStats",
    "PreparedData",
    "asset_path",
    "load_raw_dataset",
    "detect_format",
    "render_template",
    "row_to_example",
    "tokenize_example",
    "build_datasets",
]

FORMATS = ("messages", "prompt_completion", "alpaca", "text")
DATA_EXTENSIONS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
TRUNCATION_MODES = ("right", "filter")
EVAL_SPLITS = ("test", "validation")
MIN_ROWS_FOR_HOLDOUT = 10
IGNORED_FILES = {"index.json"}
ASSETS_DIR = Path(__file__).resolve().parent / "assets"
OUTPUT_COLUMNS = ("input_ids", "labels", "prompt_len", "sample_index")
IGNORE_INDEX = -100

_ALLOWED_SOURCES = (
    "a folder written by datasets.save_to_disk, a folder of .json/.jsonl/.csv/.parquet files, "
    "one such file, or a Hugging Face Hub dataset id"
)
_ALLOWED_FORMATS = (
    "'messages' (a list of {role, content}); 'prompt' + 'completion' (or 'response'); "
    "'instruction' + 'output' (+ optional 'input'); or 'text'"
)
_SPLIT_ALIASES = {
    "test": "test",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "eval": "validation",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def asset_path(name: str) -> Path:
    """Path of a bundled data file, e.g. ``asset_path("chat_small.jsonl")``."""
    return ASSETS_DIR / name


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _root_message(exc: BaseException) -> str:
    """The most specific message in an exception chain (datasets wraps the real cause)."""
    messages = []
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = str(exc).strip()
        if text:
            messages.append(f"{text}")
        exc = exc.__cause__ or exc.__context__
    if not messages:
        return "empty or unreadable file"
    return messages[-1].splitlines()[0]


def _as_dataset_dict(obj: Any) -> datasets.DatasetDict:
    if isinstance(obj, datasets.DatasetDict):
        return obj
    if isinstance(obj, datasets.Dataset):
        return datasets.DatasetDict({"train": obj})
    raise DataError(f"unsupported dataset object {type(obj).__name__}")


def _saved_without_data(path: Path) -> bool:
    """A save_to_disk folder of a 0-row Dataset (load_from_disk fails on it)."""
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and state.get("_data_files") == []


def _split_of_file(path: Path) -> str:
    stem = path.name.split(".")[0].lower()
    first = re.split(r"[-_ ]", stem)[0]
    return _SPLIT_ALIASES.get(first, "train")


def _load_files(source: str, files: Sequence[Path]) -> datasets.DatasetDict:
    builders = {DATA_EXTENSIONS[f.suffix.lower()] for f in files}
    if len(builders) > 1:
        names = ", ".join(sorted(f.name for f in files))
        raise DataError(
            f"dataset {source!r} mixes file types ({names}); use files of one kind "
            "(.json/.jsonl, .csv or .parquet)"
        )
    data_files: dict[str, list[str]] = {}
    for f in sorted(files):
        data_files.setdefault(_split_of_file(f), []).append(str(f))
    if "train" not in data_files:  # e.g. only test.jsonl: train on it
        data_files = {"train": [str(f) for f in sorted(files)]}
    try:
        return datasets.load_dataset(builders.pop(), data_files=data_files)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a user data problem
        names = ", ".join(sorted(f.name for f in files))
        raise DataError(
            f"could not read dataset {source!r} ({names}): {_root_message(exc)}. "
            "Expected valid .json (a list of objects or JSON lines), .jsonl, .csv or .parquet"
        ) from None


def load_raw_dataset(
    source: str, *, split: str | None = None, token: str | None = None
) -> datasets.DatasetDict:
    """Load ``source`` as a DatasetDict (a single Dataset becomes ``{"train": ...}``).

    With ``split``, that split becomes ``"train"``; the ``test``/``validation`` splits (other than
    ``split``) are kept for evaluation, every other split is dropped. Raises DataError (never a
    traceback) for a missing path, unreadable/corrupt file, unknown split or empty dataset.
    """
    if not isinstance(source, (str, os.PathLike)) or not str(source).strip():
        raise DataError(f"no dataset given; expected {_ALLOWED_SOURCES}")
    source = str(source).strip()
    path = Path(source).expanduser()

    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            try:
                dd = _as_dataset_dict(datasets.load_from_disk(str(path)))
            except Exception as exc:  # noqa: BLE001
                if _saved_without_data(path):
                    raise DataError(f"dataset {source!r} is empty (0 rows in its training split)") from None
                raise DataError(
                    f"could not load the saved dataset folder {source!r}: {_root_message(exc)}. "
                    "Expected an intact datasets.save_to_disk folder"
                ) from None
        else:
            files = [
                f
                for f in path.iterdir()
                if f.is_file()
                and f.suffix.lower() in DATA_EXTENSIONS
                and f.name.lower() not in IGNORED_FILES
                and not f.name.startswith(".")
            ]
            if not files:
                raise DataError(
                    f"dataset folder {source!r} holds no .json/.jsonl/.csv/.parquet data file "
                    f"({', '.join(sorted(IGNORED_FILES))} is ignored) and is not a "
                    "datasets.save_to_disk folder"
                )
            dd = _load_files(source, files)
    elif path.is_file():
        if path.suffix.lower() not in DATA_EXTENSIONS:
            raise DataError(
                f"dataset file {source!r} has an unsupported type {path.suffix or '(none)'!r}; "
                "allowed: .json, .jsonl, .csv, .parquet"
            )
        try:
            dd = datasets.load_dataset(
                DATA_EXTENSIONS[path.suffix.lower()], data_files={"train": [str(path)]}
            )
        except Exception as exc:  # noqa: BLE001
            raise DataError(
                f"could not read dataset file {source!r}: {_root_message(exc)}. "
                "Expected valid .json (a list of objects or JSON lines), .jsonl, .csv or .parquet"
            ) from None
    else:
        looks_local = (
            path.is_absolute()
            or source.startswith((".", "~"))
            or path.suffix.lower() in DATA_EXTENSIONS
            or not _HUB_ID.match(source)
        )
        if looks_local:
            raise DataError(f"dataset {source!r} not found; expected {_ALLOWED_SOURCES}")
        try:
            dd = _as_dataset_dict(datasets.load_dataset(source, token=token))
        except Exception as exc:  # noqa: BLE001 - offline, missing, gated, ...
            raise DataError(
                f"dataset {source!r} is not a local file or folder, and loading it from the "
                f"Hugging Face Hub failed: {_root_message(exc)}. Expected {_ALLOWED_SOURCES}"
            ) from None

    dd = _select_splits(dd, source, split)
    if dd["train"].num_rows == 0:
        raise DataError(f"dataset {source!r} is empty (0 rows in its training split)")
    return dd


def _select_splits(dd: datasets.DatasetDict, source: str, split: str | None) -> datasets.DatasetDict:
    names = list(dd.keys())
    if split:
        if split not in dd:
            raise DataError(f"dataset {source!r} has no split {split!r}; its splits are {names}")
        train_name = split
    elif "train" in dd:
        train_name = "train"
    elif len(names) == 1:
        train_name = names[0]
    else:
        raise DataError(
            f"dataset {source!r} has no 'train' split and several others {names}; "
            "choose one with the split setting"
        )
    out = {"train": dd[train_name]}
    for name in EVAL_SPLITS:
        if name in dd and name != train_name:
            out[name] = dd[name]
    return datasets.DatasetDict(out)


# --------------------------------------------------------------------------------------------
# Format detection and templates
# --------------------------------------------------------------------------------------------


def detect_format(column_names: Sequence[str]) -> str:
    """``"messages"``, ``"prompt_completion"``, ``"alpaca"`` or ``"text"``; else DataError."""
    cols = set(column_names)
    if "messages" in cols:
        return "messages"
    if "prompt" in cols and ({"completion", "response"} & cols):
        return "prompt_completion"
    if {"instruction", "output"} <= cols:
        return "alpaca"
    if "text" in cols:
        return "text"
    raise DataError(
        f"cannot tell the dataset format from its columns {sorted(cols)}; expected {_ALLOWED_FORMATS}, "
        "or set input_template/output_template"
    )


@lru_cache(maxsize=1)
def _jinja_env():
    from jinja2 import StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(
        undefined=StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
        finalize=lambda value: "" if value is None else value,
    )


@lru_cache(maxsize=32)
def _compile(template: str, field_name: str):
    from jinja2 import TemplateSyntaxError

    try:
        return _jinja_env().from_string(template)
    except TemplateSyntaxError as exc:
        raise DataError(f"{field_name}: template syntax error on line {exc.lineno}: {exc.message}") from None


def render_template(template: str, row: Mapping[str, Any], *, field_name: str = "template") -> str:
    """Render a user Jinja template in the sandbox with the row's columns as variables.

    Syntax errors, undefined variables and unsafe attribute access raise DataError naming
    ``field_name``.
    """
    from jinja2 import TemplateError
    from jinja2.sandbox import SecurityError

    compiled = _compile(template, field_name)
    try:
        return compiled.render(dict(row))
    except SecurityError as exc:
        raise DataError(f"{field_name}: refused by the template sandbox: {exc}") from None
    except TemplateError as exc:
        raise DataError(
            f"{field_name}: rendering failed: {exc} (available columns: {sorted(row)})"
        ) from None
    except Exception as exc:  # noqa: BLE001 - e.g. a filter applied to the wrong type
        raise DataError(f"{field_name}: rendering failed: {type(exc).__name__}: {exc}") from None


# --------------------------------------------------------------------------------------------
# Row -> example
# --------------------------------------------------------------------------------------------


@dataclass
class Example:
    """A row in normal form: ``text`` (pretraining) or a chat whose last message is the response."""

    kind: str  # "text" | "chat" | "drop"
    text: str = ""
    messages: list[dict[str, str]] = field(default_factory=list)
    drop_reason: str = ""


def _drop(reason: str) -> Example:
    return Example(kind="drop", drop_reason=reason)


def _str(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else str(value)


def _normalize_messages(value: Any) -> list[dict[str, str]] | None:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    if not isinstance(value, (list, tuple)):
        return None
    out = []
    for msg in value:
        if not isinstance(msg, Mapping) or not isinstance(msg.get("role"), str):
            return None
        content = msg.get("content")
        if content is not None and not isinstance(content, str):
            return None
        out.append({"role": msg["role"], "content": content or ""})
    return out


def _chat(prompt: str, response: str, system: str | None) -> Example:
    msgs = [{"role": "system", "content": system}] if system else []
    msgs += [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    return Example(kind="chat", messages=msgs)


def row_to_example(
    row: Mapping[str, Any],
    fmt: str,
    *,
    input_template: str | None = None,
    output_template: str | None = None,
    instruction_template: str | None = None,
) -> Example:
    """Normalise one raw row (``fmt`` from ``detect_format``; ignored when templates are given)."""
    system = instruction_template or None
    if output_template:
        response = render_template(output_template, row, field_name="output_template")
        if not input_template:
            return Example(kind="text", text=response) if response.strip() else _drop("empty")
        prompt = render_template(input_template, row, field_name="input_template")
        return _chat(prompt, response, system)
    if input_template:
        raise ConfigError("input_template needs an output_template too (the response to train on)")

    if fmt == "text":
        text = _str(row.get("text"))
        return Example(kind="text", text=text) if text and text.strip() else _drop("empty")
    if fmt == "messages":
        msgs = _normalize_messages(row.get("messages"))
        if msgs is None:
            return _drop("malformed")
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        if last is None:
            return _drop("no_assistant_turn")
        msgs = msgs[: last + 1]
        if system and msgs[0]["role"] != "system":
            msgs = [{"role": "system", "content": system}] + msgs
        return Example(kind="chat", messages=msgs)
    if fmt == "prompt_completion":
        prompt = row.get("prompt")
        completion = row.get("completion") if row.get("completion") is not None else row.get("response")
        if isinstance(prompt, (list, tuple)):  # conversational prompt/completion
            msgs = _normalize_messages(prompt)
            if isinstance(completion, (list, tuple)):
                tail = _normalize_messages(completion)
            else:
                tail = None if completion is None else [{"role": "assistant", "content": _str(completion)}]
            if msgs is None or tail is None:
                return _drop("malformed" if completion is not None else "empty")
            return row_to_example({"messages": msgs + tail}, "messages", instruction_template=instruction_template)
        prompt, completion = _str(prompt), _str(completion)
        if completion is None or prompt is None:
            return _drop("empty")
        return _chat(prompt, completion, system)
    if fmt == "alpaca":
        instruction, inp, output = _str(row.get("instruction")), _str(row.get("input")), _str(row.get("output"))
        if instruction is None or output is None:
            return _drop("empty")
        prompt = f"{instruction}\n\n{inp}" if inp and inp.strip() else instruction
        return _chat(prompt, output, system)
    raise ConfigError(f"unknown data format {fmt!r}; allowed: {', '.join(FORMATS)}")


# --------------------------------------------------------------------------------------------
# Tokenisation
# --------------------------------------------------------------------------------------------


def _ids(tokenizer, text: str, *, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _end_id(tokenizer) -> int | None:
    eos = getattr(tokenizer, "eos_token_id", None)
    return eos if eos is not None else getattr(tokenizer, "sep_token_id", None)


def _plain_prompt(messages: list[dict[str, str]]) -> str:
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    lines = [f"{m['role']}: {m['content']}" for m in messages]
    return "\n".join(lines + ["assistant:"])


def _chat_ids(tokenizer, messages: list[dict[str, str]], **kwargs) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)
    return list(out["input_ids"])


def _tokenize_chat(tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], int, bool]:
    """(input_ids, prompt_len, used_fallback) for a chat whose last message is the response."""
    prompt_msgs, response = messages[:-1], messages[-1]["content"]
    if getattr(tokenizer, "chat_template", None):
        try:
            full = _chat_ids(tokenizer, messages)
            prompt = _chat_ids(tokenizer, prompt_msgs, add_generation_prompt=True) if prompt_msgs else []
            if full[: len(prompt)] == prompt:
                return full, len(prompt), False
            full_text = tokenizer.apply_chat_template(messages, tokenize=False)
            prompt_text = tokenizer.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001 - templates raise on conversations they refuse
            raise DataError(
                f"the tokenizer's chat template failed on a conversation with roles "
                f"{[m['role'] for m in messages]}: {_root_message(exc)}"
            ) from None
        if full_text.startswith(prompt_text):
            rest = _ids(tokenizer, full_text[len(prompt_text):], special=False)
        else:
            end = _end_id(tokenizer)
            rest = _ids(tokenizer, response, special=False) + ([end] if end is not None else [])
        return prompt + rest, len(prompt), True
    prompt = _ids(tokenizer, _plain_prompt(prompt_msgs), special=True)
    end = _end_id(tokenizer)
    rest = _ids(tokenizer, response, special=False) + ([end] if end is not None else [])
    return prompt + rest, len(prompt), False


def _tokenize_text(tokenizer, text: str) -> tuple[list[int], int]:
    ids = _ids(tokenizer, text, special=True)
    starts = {i for i in (getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "cls_token_id", None)) if i is not None}
    prompt_len = 1 if ids and ids[0] in starts else 0
    end = _end_id(tokenizer)
    if end is not None and (not ids or ids[-1] != end):
        ids.append(end)
    return ids, prompt_len


def tokenize_example(
    row: Mapping[str, Any],
    tokenizer,
    *,
    fmt: str,
    max_length: int | None,
    truncation: str = "right",
    mask_prompt_loss: bool = True,
    input_template: str | None = None,
    output_template: str | None = None,
    instruction_template: str | None = None,
) -> dict[str, Any]:
    """Tokenise one raw row.

    Returns ``{"input_ids": list[int], "labels": list[int], "prompt_len": int,
    "drop_reason": str, "truncated": bool, "template_fallback": bool}``; ``drop_reason`` is ""
    for a kept row, else one of the reasons in the module docstring (then the lists are empty).
    """
    if truncation not in TRUNCATION_MODES:
        raise ConfigError(f"truncation must be one of {TRUNCATION_MODES}, got {truncation!r}")
    ex = row_to_example(
        row,
        fmt,
        input_template=input_template,
        output_template=output_template,
        instruction_template=instruction_template,
    )
    if ex.kind == "drop":
        return _dropped(ex.drop_reason)
    fallback = False
    if ex.kind == "text":
        ids, prompt_len = _tokenize_text(tokenizer, ex.text)
    else:
        ids, prompt_len, fallback = _tokenize_chat(tokenizer, ex.messages)
    if not ids:
        return _dropped("empty")
    truncated = False
    if max_length is not None and len(ids) > max_length:
        if truncation == "filter":
            return _dropped("too_long")
        ids, truncated = ids[:max_length], True
    prompt_len = min(prompt_len, len(ids))
    labels = [IGNORE_INDEX] * prompt_len + ids[prompt_len:] if mask_prompt_loss else list(ids)
    if all(label == IGNORE_INDEX for label in labels):
        return _dropped("no_trainable_tokens")
    return {
        "input_ids": ids,
        "labels": labels,
        "prompt_len": prompt_len,
        "drop_reason": "",
        "truncated": truncated,
        "template_fallback": fallback,
    }


def _dropped(reason: str) -> dict[str, Any]:
    return {
        "input_ids": [],
        "labels": [],
        "prompt_len": 0,
        "drop_reason": reason,
        "truncated": False,
        "template_fallback": False,
    }


# --------------------------------------------------------------------------------------------
# build_datasets
# --------------------------------------------------------------------------------------------


@dataclass
class DataStats:
    """What ``build_datasets`` did; ``log`` gets ``summary()``."""

    source: str
    format: str  # detected format, or "template"
    rows_in: int  # raw rows, train + eval
    train_rows: int
    eval_rows: int
    eval_from: str  # "test split" | "validation split" | "10% holdout, seed 42" | "none"
    dropped: dict[str, int]  # reason -> rows (train + eval)
    truncated: int  # rows cut by truncation="right"
    template_fallback: int  # rows where the chat-template prompt was not a token prefix
    mean_tokens: float  # over kept train rows
    max_tokens: int
    max_length: int | None

    @property
    def rows_out(self) -> int:
        return self.train_rows + self.eval_rows

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {**asdict(self), "rows_out": self.rows_out, "dropped_total": self.dropped_total}

    def summary(self) -> str:
        dropped = ", ".join(f"{k} {v}" for k, v in sorted(self.dropped.items())) or "none"
        return (
            f"data: {self.source} [{self.format}]: {self.rows_in} rows -> train {self.train_rows}, "
            f"eval {self.eval_rows} ({self.eval_from}); dropped {self.dropped_total} ({dropped}); "
            f"truncated {self.truncated}; tokens/row mean {self.mean_tokens:.1f} max {self.max_tokens} "
            f"(max_length {self.max_length})"
        )


@dataclass
class PreparedData:
    train: datasets.Dataset
    eval: datasets.Dataset | None
    stats: DataStats


_FEATURES = datasets.Features(
    {
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "labels": datasets.Sequence(datasets.Value("int32")),
        "prompt_len": datasets.Value("int32"),
        "drop_reason": datasets.Value("string"),
        "truncated": datasets.Value("bool"),
        "template_fallback": datasets.Value("bool"),
    }
)


def _map_row(row: dict, index: int, split_name: str, **kwargs) -> dict[str, Any]:
    try:
        return tokenize_example(row, **kwargs)
    except DataError as exc:
        raise DataError(f"{split_name} row {index}: {exc}") from None


def _writable(directory: str) -> bool:
    return os.access(directory, os.W_OK)


def _cache_file_name(ds: datasets.Dataset, name: str) -> str | None:
    """None (datasets' default, a cache file beside the data) unless that folder is read-only."""
    if not ds.cache_files:
        return None
    folder = os.path.dirname(ds.cache_files[0]["filename"])
    if _writable(folder):
        return None
    return os.path.join(tempfile.mkdtemp(prefix="dllm-data-"), f"tokenized-{name}.arrow")


def _tokenize_split(
    ds: datasets.Dataset, name: str, tokenizer, fmt: str, num_proc: int, opts: dict
) -> tuple[datasets.Dataset, Counter, int, int]:
    num_proc = num_proc if num_proc and num_proc > 1 and ds.num_rows > 1 else None
    if num_proc:
        num_proc = min(num_proc, ds.num_rows)
    mapped = ds.map(
        _map_row,
        cache_file_name=_cache_file_name(ds, name),
        with_indices=True,
        fn_kwargs={"split_name": name, "tokenizer": tokenizer, "fmt": fmt, **opts},
        remove_columns=ds.column_names,
        features=_FEATURES,
        num_proc=num_proc,
        desc=f"tokenizing {name}",
    )
    info = mapped.select_columns(["drop_reason", "truncated", "template_fallback"])[:]
    reasons = info["drop_reason"]
    dropped = Counter(r for r in reasons if r)
    keep = [i for i, r in enumerate(reasons) if not r]
    truncated = sum(info["truncated"])
    fallback = sum(info["template_fallback"])
    kept = mapped.select(keep) if len(keep) != mapped.num_rows else mapped
    kept = kept.remove_columns(["drop_reason", "truncated", "template_fallback"])
    kept = kept.flatten_indices() if len(keep) != mapped.num_rows else kept
    kept = kept.add_column("sample_index", list(range(kept.num_rows)))
    return kept, dropped, truncated, fallback


def _split_format(ds: datasets.Dataset, source: str, name: str, templated: bool) -> str:
    if templated:
        return "template"
    try:
        return detect_format(ds.column_names)
    except DataError as exc:
        raise DataError(f"dataset {source!r}, split {name!r}: {exc}") from None


def build_datasets(
    source: str,
    tokenizer,
    *,
    max_length: int,
    truncation: str = "right",
    mask_prompt_loss: bool = True,
    input_template: str | None = None,
    output_template: str | None = None,
    instruction_template: str | None = None,
    num_proc: int = 1,
    seed: int = 42,
    split: str | None = None,
    eval_fraction: float = 0.1,
    token: str | None = None,
    log: Callable[[str], Any] | None = print,
) -> PreparedData:
    """Load, format, tokenise and split ``source``; see the module docstring for the rules."""
    if truncation not in TRUNCATION_MODES:
        raise ConfigError(f"truncation must be one of {TRUNCATION_MODES}, got {truncation!r}")
    if not isinstance(max_length, int) or max_length < 1:
        raise ConfigError(f"max_length must be a positive integer, got {max_length!r}")
    if not 0 <= eval_fraction < 1:
        raise ConfigError(f"eval_fraction must be in [0, 1), got {eval_fraction!r}")
    input_template = input_template or None
    output_template = output_template or None
    instruction_template = instruction_template or None
    if input_template and not output_template:
        raise ConfigError("input_template needs an output_template too (the response to train on)")
    for name, tmpl in (("input_template", input_template), ("output_template", output_template)):
        if tmpl:
            _compile(tmpl, name)  # syntax errors surface before any work

    raw = load_raw_dataset(source, split=split, token=token)
    train_raw = raw["train"]
    eval_name = next((n for n in EVAL_SPLITS if n in raw), None)
    templated = bool(output_template)
    fmt = _split_format(train_raw, source, "train", templated)
    if eval_name is not None:
        eval_raw = raw[eval_name]
        eval_fmt = _split_format(eval_raw, source, eval_name, templated)
        eval_from = f"{eval_name} split"
    elif eval_fraction > 0 and train_raw.num_rows >= MIN_ROWS_FOR_HOLDOUT:
        n = train_raw.num_rows
        n_eval = max(1, math.ceil(eval_fraction * n))
        perm = np.random.default_rng(seed).permutation(n)
        eval_raw = train_raw.select(sorted(perm[:n_eval].tolist()))
        train_raw = train_raw.select(sorted(perm[n_eval:].tolist()))
        eval_fmt = fmt
        eval_from = f"{eval_fraction:.0%} holdout, seed {seed}"
    else:
        eval_raw, eval_fmt, eval_from = None, fmt, "none"

    if templated and train_raw.num_rows:  # render the first row here for a clean early error
        first = train_raw[0]
        if input_template:
            render_template(input_template, first, field_name="input_template")
        render_template(output_template, first, field_name="output_template")

    opts = dict(
        max_length=max_length,
        truncation=truncation,
        mask_prompt_loss=mask_prompt_loss,
        input_template=input_template,
        output_template=output_template,
        instruction_template=instruction_template,
    )
    rows_in = train_raw.num_rows + (eval_raw.num_rows if eval_raw is not None else 0)
    train, dropped, truncated, fallback = _tokenize_split(train_raw, "train", tokenizer, fmt, num_proc, opts)
    eval_ds = None
    if eval_raw is not None:
        eval_ds, e_dropped, e_trunc, e_fallback = _tokenize_split(
            eval_raw, "eval", tokenizer, eval_fmt, num_proc, opts
        )
        dropped += e_dropped
        truncated += e_trunc
        fallback += e_fallback
        if eval_ds.num_rows == 0:
            eval_ds = None

    if train.num_rows == 0:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(dropped.items()))
        raise DataError(
            f"all {train_raw.num_rows} training rows of {source!r} were dropped ({reasons}): "
            f"they are empty or have no trainable token after truncation to max_length={max_length}"
            + (" (truncation='filter' drops rows longer than max_length)" if truncation == "filter" else "")
        )

    lengths = pc.list_value_length(train.with_format("arrow")[:]["input_ids"]).to_numpy()
    stats = DataStats(
        source=source,
        format=fmt,
        rows_in=rows_in,
        train_rows=train.num_rows,
        eval_rows=eval_ds.num_rows if eval_ds is not None else 0,
        eval_from=eval_from if eval_ds is not None else "none",
        dropped=dict(dropped),
        truncated=truncated,
        template_fallback=fallback,
        mean_tokens=float(np.mean(lengths)),
        max_tokens=int(max(lengths)),
        max_length=max_length,
    )
    if log is not None:
        log(stats.summary())
    return PreparedData(train=train, eval=eval_ds, stats=stats)
