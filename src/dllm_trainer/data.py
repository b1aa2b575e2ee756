"""Data pipeline: load a dataset, detect its row format, render optional templates, tokenise, split.

Plain functions with explicit keyword arguments (no config object), so they can be used standalone::

    prepared = build_datasets("data.jsonl", tokenizer, max_length=512)
    prepared.train, prepared.eval, prepared.stats

Sources (``load_raw_dataset``)
    a folder written by ``datasets.save_to_disk`` (Dataset or DatasetDict); a folder of
    ``.json`` / ``.jsonl`` / ``.csv`` / ``.parquet`` files (a file named ``index.json``, which
    Transformer Lab writes beside uploaded data, is ignored; the last split word in a file's
    name decides its split, as in Transformer Lab's ``<name>_train.jsonl`` / ``<name>_eval.jsonl``:
    ``test``/``testing`` -> ``test``, ``validation``/``valid``/``val``/``dev``/``eval``/
    ``evaluation`` -> ``validation``, anything else ``train``); one such file; otherwise a
    Hugging Face Hub dataset id (``datasets.load_dataset(source, token=token)``).
    A file that cannot be read is named with its line and the reason (broken JSON line, an
    empty file, a CSV with only a header); ``RowOrigins`` names the file and line of any row.

Row formats (``detect_format``, first match wins)
    ``messages``           a ``messages`` (or ShareGPT ``conversations``) column: a list of
                           ``{"role", "content"}`` dicts (a JSON string is accepted too; ShareGPT
                           ``{"from", "value"}`` with ``human``/``gpt`` become user/assistant;
                           OpenAI content-part lists become their text parts joined; a non-text
                           part drops the row). The LAST assistant message is the
                           response; everything before it is the prompt (earlier assistant turns
                           included); messages after it are ignored. No assistant turn -> dropped.
    ``prompt_completion``  ``prompt`` + ``completion`` (or ``response``). A list-of-messages
                           ``prompt`` (TRL conversational style) is accepted too.
    ``alpaca``             ``instruction`` + ``output`` (+ optional ``input``); the user prompt is
                           ``instruction`` or ``instruction + "\\n\\n" + input``.
    ``text``               ``text`` only: pretraining rows, no prompt, everything trainable.

    One format per dataset: a row of another format (datasets unions the columns of a file whose
    rows differ) is an error naming its file and line.

Templates (Transformer Lab's alpaca Data Template: Instruction / Input / Output)
    ``instruction_template`` / ``input_template`` / ``output_template`` are Jinja strings rendered
    with the row's columns as variables in a sandbox (``jinja2.sandbox.ImmutableSandboxedEnvironment``,
    undefined variables are errors, ``None`` renders as ""). When they fit the dataset
    (``plan_templates``) they override format detection: the rendered instruction is the system
    message ("usually the system message", as the app's Train modal says), the rendered input the
    user message, the rendered output the response. ``output_template`` alone renders a ``text``
    row. The app sends its defaults (``Instruction: {{instruction}}``, ``{{input}}``,
    ``{{output}}``) with every job: a template that reads none of the dataset's columns is not
    used when the dataset has a known format (logged); one that reads some missing columns is an
    error. ``system_prompt`` is a plain system message put before every chat prompt (not added
    when a ``messages`` row already starts with one; ignored for ``text`` rows).

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
    rows longer than ``max_length``. Rows with no trainable label are dropped. Drop reasons
    (counted, and the first rows named by file and line in the summary): ``empty`` (no text /
    no prompt), ``empty_completion`` (the response is missing or an empty string),
    ``no_assistant_turn``, ``malformed`` (messages that are not a list of role/content dicts),
    ``non_text_content`` (an image or other non-text content part), ``too_long`` (filter mode),
    ``no_trainable_tokens`` (e.g. the prompt fills ``max_length``).

Eval split (``plan_datasets``)
    None at all with ``evaluation=False`` (eval_strategy "no"). Else the dataset's own ``test``
    (else ``validation``) split when present (no row of train is held out); otherwise, when the
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
    "RowOrigins",
    "RawDataset",
    "DataPlan",
    "open_dataset",
    "load_raw_dataset",
    "plan_datasets",
    "plan_templates",
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
    "train": "train",
    "training": "train",
    "test": "test",
    "testing": "test",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "eval": "validation",
    "evaluation": "validation",
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


def _hub_reason(exc: BaseException) -> str:
    """datasets' offline message ("Dataset x is not cached in None") in words a user can act on."""
    text = _root_message(exc)
    if "is not cached in" in text or "Name or service not known" in text or "offline" in text.lower():
        return ("it is not in the local Hugging Face datasets cache and the Hub cannot be reached "
                "(offline, or HF_DATASETS_OFFLINE / HF_HUB_OFFLINE is set)")
    return text


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
    """The split a data file belongs to, from the LAST split word in its name, as Transformer Lab
    names uploads (``<name>_train.jsonl``, ``<name>_eval.jsonl``) and as Hugging Face's own
    folder loader does (``test``, ``validation``, ``dev``, ...); no split word: train."""
    stem = path.name[: len(path.name) - len(path.suffix)].lower()
    for word in reversed([w for w in re.split(r"[-_ .0-9]+", stem) if w]):
        if word in _SPLIT_ALIASES:
            return _SPLIT_ALIASES[word]
    return "train"


# ---- where a raw row came from (file and line), for messages about single rows ------------------


def _json_is_array(path: str) -> bool:
    with open(path, encoding="utf-8", errors="replace") as fh:
        while True:
            chunk = fh.read(4096)
            if not chunk:
                return False
            stripped = chunk.lstrip()
            if stripped:
                return stripped[0] == "["


def _row_lines(path: str) -> list[int] | None:
    """1-based line number of each row of one data file, in the order datasets reads them;
    None when rows have no line (parquet)."""
    kind = DATA_EXTENSIONS.get(Path(path).suffix.lower())
    if kind == "json":
        if _json_is_array(path):
            text = Path(path).read_text(encoding="utf-8", errors="replace")
            decoder, pos, lines = json.JSONDecoder(), text.index("[") + 1, []
            while True:
                while pos < len(text) and text[pos] in " \t\r\n,":
                    pos += 1
                if pos >= len(text) or text[pos] == "]":
                    return lines
                lines.append(text.count("\n", 0, pos) + 1)
                try:
                    _, pos = decoder.raw_decode(text, pos)
                except ValueError:
                    return lines
        with open(path, encoding="utf-8", errors="replace") as fh:
            return [n for n, line in enumerate(fh, 1) if line.strip()]  # blank lines hold no row
    if kind == "csv":
        import csv

        with open(path, encoding="utf-8", errors="replace", newline="") as fh:
            reader = csv.reader(fh)
            lines, header = [], False
            while True:
                start = reader.line_num + 1
                try:
                    record = next(reader)
                except StopIteration:
                    return lines
                except csv.Error:
                    return lines
                if not record or not any(cell.strip() for cell in record):
                    continue  # pandas skips blank lines
                if header:
                    lines.append(start)
                header = True
    return None


@lru_cache(maxsize=64)
def _row_lines_cached(path: str, mtime: float, size: int) -> tuple[list[int] | None, int]:
    lines = _row_lines(path)
    if lines is None:
        import pyarrow.parquet as pq

        return None, pq.ParquetFile(path).metadata.num_rows
    return lines, len(lines)


@dataclass(frozen=True)
class RowOrigins:
    """Where the rows of one split came from, to name a row's file and line in messages.

    ``files``: the split's data files in the order datasets read them (empty for a saved or Hub
    dataset: rows are then named by index); ``rows``: for a split that is a selection (the eval
    holdout), the raw row index of each of its rows."""

    split: str
    files: tuple[str, ...] = ()
    rows: tuple[int, ...] | None = None

    def select(self, indices: Sequence[int]) -> "RowOrigins":
        base = self.rows
        picked = tuple(base[i] for i in indices) if base is not None else tuple(int(i) for i in indices)
        return RowOrigins(self.split, self.files, picked)

    def where(self, index: int) -> str:
        raw = self.rows[index] if self.rows is not None else index
        for path in self.files:
            try:
                st = os.stat(path)
                lines, count = _row_lines_cached(path, st.st_mtime, st.st_size)
            except (OSError, ValueError):
                break
            if raw < count:
                name = os.path.basename(path)
                return f"'{name}' line {lines[raw]}" if lines is not None else f"'{name}' row {raw + 1}"
            raw -= count
        return f"{self.split} row {self.rows[index] if self.rows is not None else index}"


def _diagnose_file(path: str) -> str | None:
    """The first row-level reason a data file cannot be read ("'f.jsonl' line 7: ..."), or None."""
    name = os.path.basename(path)
    kind = DATA_EXTENSIONS.get(Path(path).suffix.lower())
    try:
        if kind == "json":
            text = Path(path).read_text(encoding="utf-8")
            if not text.strip():
                return f"'{name}' is empty"
            if text.lstrip()[0] == "[":
                try:
                    items = json.loads(text)
                except json.JSONDecodeError as e:
                    return f"'{name}' line {e.lineno}: not valid JSON ({e.msg} at column {e.colno})"
                bad = next((i for i, item in enumerate(items) if not isinstance(item, dict)), None)
                if bad is not None:
                    return f"'{name}' item {bad + 1}: a JSON {type(items[bad]).__name__}, expected an object of columns"
                return None if items else f"'{name}' holds an empty list (no rows)"
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    return f"'{name}' line {n}: not valid JSON ({e.msg} at column {e.colno})"
                if not isinstance(row, dict):
                    return f"'{name}' line {n}: a JSON {type(row).__name__}, expected one object of columns per line"
            return None
        if kind == "csv":
            if not Path(path).read_text(encoding="utf-8").strip():
                return f"'{name}' is empty"
            lines = _row_lines(path)
            if lines == []:
                import csv

                with open(path, encoding="utf-8", newline="") as fh:
                    header = next(csv.reader(fh), [])
                return f"'{name}' has only a header line ({', '.join(header)}) and no data rows"
            return None
    except UnicodeDecodeError as e:
        return f"'{name}' is not UTF-8 text (byte {e.start})"
    except OSError as e:
        return f"'{name}' cannot be read ({e.strerror or e})"
    return None


def _no_rows_problem(path: str) -> str | None:
    """Cheap check (reads at most a few lines): an empty file, or a CSV with only its header."""
    name = os.path.basename(path)
    if DATA_EXTENSIONS.get(Path(path).suffix.lower()) not in ("json", "csv"):
        return None
    try:
        with open(path, encoding="utf-8", errors="replace", newline="") as fh:
            head = [line for _, line in zip(range(1000), fh) if line.strip()][:2]
    except OSError as e:
        return f"'{name}' cannot be read ({e.strerror or e})"
    if not head:
        return f"'{name}' is empty"
    if DATA_EXTENSIONS.get(Path(path).suffix.lower()) == "csv" and len(head) == 1:
        import csv

        header = next(csv.reader([head[0]]), [])
        return f"'{name}' has only a header line ({', '.join(h.strip() for h in header)}) and no data rows"
    return None


def _load_files(source: str, files: Sequence[Path]) -> tuple[datasets.DatasetDict, dict[str, tuple[str, ...]]]:
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
    for paths in data_files.values():  # a file with no rows fails the whole load with an obscure message
        for p in paths:
            problem = _no_rows_problem(p)
            if problem:
                raise DataError(f"dataset {source!r}: {problem}")
    try:
        dd = datasets.load_dataset(builders.pop(), data_files=data_files)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a user data problem
        for paths in data_files.values():
            for p in paths:
                problem = _diagnose_file(p)
                if problem:
                    raise DataError(f"dataset {source!r}: {problem}") from None
        names = ", ".join(sorted(f.name for f in files))
        what = "dataset file" if len(files) == 1 else "dataset"
        raise DataError(
            f"could not read {what} {source!r} ({names}): {_root_message(exc)}. "
            "Expected valid .json (a list of objects or JSON lines), .jsonl, .csv or .parquet"
        ) from None
    return dd, {split: tuple(paths) for split, paths in data_files.items()}


@dataclass
class RawDataset:
    """A loaded dataset: its splits (``train`` plus ``test``/``validation`` when present) and where
    each split's rows came from."""

    source: str
    splits: datasets.DatasetDict
    origins: dict[str, RowOrigins]


def open_dataset(source: str, *, split: str | None = None, token: str | None = None) -> RawDataset:
    """Load ``source`` (see ``load_raw_dataset``), remembering the data file of each row."""
    if not isinstance(source, (str, os.PathLike)) or not str(source).strip():
        raise DataError(f"no dataset given; expected {_ALLOWED_SOURCES}")
    source = str(source).strip()
    path = Path(source).expanduser()
    files: dict[str, tuple[str, ...]] = {}

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
            found = [
                f
                for f in path.iterdir()
                if f.is_file()
                and f.suffix.lower() in DATA_EXTENSIONS
                and f.name.lower() not in IGNORED_FILES
                and not f.name.startswith(".")
            ]
            if not found:
                raise DataError(
                    f"dataset folder {source!r} holds no .json/.jsonl/.csv/.parquet data file "
                    f"({', '.join(sorted(IGNORED_FILES))} is ignored) and is not a "
                    "datasets.save_to_disk folder"
                )
            dd, files = _load_files(source, found)
    elif path.is_file():
        if path.suffix.lower() not in DATA_EXTENSIONS:
            raise DataError(
                f"dataset file {source!r} has an unsupported type {path.suffix or '(none)'!r}; "
                "allowed: .json, .jsonl, .csv, .parquet"
            )
        dd, files = _load_files(source, [path])
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
                f"Hugging Face Hub failed: {_hub_reason(exc)}. Expected {_ALLOWED_SOURCES}"
            ) from None

    dd, names = _select_splits(dd, source, split)
    if dd["train"].num_rows == 0:
        raise DataError(f"dataset {source!r} is empty (0 rows in its training split)")
    origins = {new: RowOrigins(new, files.get(old, ())) for new, old in names.items()}
    return RawDataset(source, dd, origins)


def load_raw_dataset(
    source: str, *, split: str | None = None, token: str | None = None
) -> datasets.DatasetDict:
    """Load ``source`` as a DatasetDict (a single Dataset becomes ``{"train": ...}``).

    With ``split``, that split becomes ``"train"``; the ``test``/``validation`` splits (other than
    ``split``) are kept for evaluation, every other split is dropped. Raises DataError (never a
    traceback) for a missing path, unreadable/corrupt file (naming the file and line), unknown
    split or empty dataset.
    """
    return open_dataset(source, split=split, token=token).splits


def _select_splits(
    dd: datasets.DatasetDict, source: str, split: str | None
) -> tuple[datasets.DatasetDict, dict[str, str]]:
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
    picked = {"train": train_name}
    for name in EVAL_SPLITS:
        if name in dd and name != train_name:
            picked[name] = name
    return datasets.DatasetDict({new: dd[old] for new, old in picked.items()}), picked


# --------------------------------------------------------------------------------------------
# Format detection and templates
# --------------------------------------------------------------------------------------------

# The columns that make a row one of the FORMATS (each inner tuple: alternatives, any one).
# ``conversations`` is ShareGPT's name for the message list.
_KEY_COLUMNS = {
    "messages": (("messages", "conversations"),),
    "prompt_completion": (("prompt",), ("completion", "response")),
    "alpaca": (("instruction",), ("output",)),
    "text": (("text",),),
}


def detect_format(column_names: Sequence[str]) -> str:
    """``"messages"``, ``"prompt_completion"``, ``"alpaca"`` or ``"text"``; else DataError."""
    cols = set(column_names)
    for fmt in FORMATS:
        if all(cols & set(alternatives) for alternatives in _KEY_COLUMNS[fmt]):
            return fmt
    raise DataError(
        f"cannot tell the dataset format from its columns {sorted(cols)}; expected {_ALLOWED_FORMATS}, "
        "or a Data Template (input_template/output_template) over its columns"
    )


def _row_formats(ds: datasets.Dataset) -> np.ndarray:
    """For each row, the index in FORMATS of the first format whose key columns the row fills
    (non-null), or -1 (an empty row). datasets gives a file whose rows have different key sets the
    union of the columns, with nulls where a row has no such key."""
    cols = set(ds.column_names)
    needed = sorted({c for fmt in FORMATS for alts in _KEY_COLUMNS[fmt] for c in alts if c in cols})
    out = np.full(ds.num_rows, -1, dtype=np.int64)
    if not needed or ds.num_rows == 0:
        return out
    table = ds.select_columns(needed).with_format("arrow")[:]
    valid = {c: pc.is_valid(table[c]).to_numpy(zero_copy_only=False) for c in needed}
    none = np.zeros(ds.num_rows, dtype=bool)
    for k in range(len(FORMATS) - 1, -1, -1):  # first format wins: assign the last one first
        ok = np.ones(ds.num_rows, dtype=bool)
        for alternatives in _KEY_COLUMNS[FORMATS[k]]:
            present = [valid[c] for c in alternatives if c in valid]
            ok &= np.logical_or.reduce(present) if present else none
        out[ok] = k
    return out


def split_format(ds: datasets.Dataset, origins: "RowOrigins", source: str) -> str:
    """The row format of one split; DataError naming the file and line of the first row whose
    format differs from the first row's (one format per dataset)."""
    kinds = _row_formats(ds)
    filled = np.flatnonzero(kinds >= 0)
    if filled.size == 0:
        try:
            return detect_format(ds.column_names)
        except DataError as exc:
            raise DataError(f"dataset {source!r}, split {origins.split!r}: {exc}") from None
    first = int(filled[0])
    fmt = FORMATS[kinds[first]]
    other = filled[kinds[filled] != kinds[first]]
    if other.size:
        row = int(other[0])
        raise DataError(
            f"dataset {source!r}: {origins.where(row)} is a '{FORMATS[kinds[row]]}' row "
            f"({_format_keys(FORMATS[kinds[row]])}) but {origins.where(first)} is a '{fmt}' row "
            f"({_format_keys(fmt)}); use one row format per dataset"
        )
    return fmt


def _format_keys(fmt: str) -> str:
    return " + ".join("/".join(alts) for alts in _KEY_COLUMNS[fmt])


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


def template_columns(template: str, field_name: str = "template") -> set[str]:
    """The row columns a template reads (its free variables, without Jinja's globals)."""
    from jinja2 import TemplateSyntaxError, meta

    env = _jinja_env()
    try:
        names = meta.find_undeclared_variables(env.parse(template))
    except TemplateSyntaxError as exc:
        raise DataError(f"{field_name}: template syntax error on line {exc.lineno}: {exc.message}") from None
    return set(names) - set(env.globals)


TEMPLATE_FIELDS = ("instruction_template", "input_template", "output_template")


def plan_templates(templates: Mapping[str, str | None], columns: Sequence[str], *, source: str,
                   has_format: bool) -> tuple[bool, str | None]:
    """Whether the Data Template (Transformer Lab's alpaca fields) defines the rows: (use, note).

    The app sends all three fields with every job, by default ``Instruction: {{instruction}}`` /
    ``{{input}}`` / ``{{output}}``, whatever the dataset's columns. So: a template whose columns are
    all in the dataset is used; one that reads none of the dataset's columns while the dataset has
    a known row format (e.g. the defaults on a chat dataset) is not used, and ``note`` says so; a
    template that reads some existing and some missing columns is an error naming them."""
    given = {name: t for name, t in templates.items() if t}
    if not given.get("output_template"):
        if given:
            raise ConfigError(
                f"{' and '.join(sorted(given))} {'needs' if len(given) == 1 else 'need'} an output_template too "
                "(the response to train on)"
            )
        return False, None
    cols = set(columns)
    wanted = {name: template_columns(t, name) for name, t in given.items()}
    used = set().union(*wanted.values())
    missing = {name: sorted(v - cols) for name, v in wanted.items() if v - cols}
    if not missing:
        return True, None
    if not used & cols and not has_format:
        raise DataError(
            f"dataset '{source}': cannot tell the dataset format from its columns {sorted(cols)}; expected "
            f"{_ALLOWED_FORMATS}; and the Data Template reads columns {', '.join(sorted(used))}, which it does not have"
        )
    if not used & cols:
        return False, (
            f"[dllm] the Data Template reads columns {', '.join(sorted(used))}, which dataset '{source}' does "
            f"not have (its columns: {', '.join(sorted(cols))}); training on its rows as they are"
        )
    detail = "; ".join(f"{name} reads {', '.join(v)}" for name, v in sorted(missing.items()))
    raise DataError(
        f"the Data Template does not fit dataset '{source}': {detail}, not among its columns "
        f"({', '.join(sorted(cols))}); use {{{{column}}}} names from that list"
    )


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


# ShareGPT's speaker names; other roles are passed on as they are.
_ROLE_ALIASES = {"human": "user", "gpt": "assistant"}


def _content_text(content: Any) -> str | None:
    """A message's text: a string, or an OpenAI content-part list whose text parts are joined
    (as chat templates render them). None when the content is not text (e.g. an image part)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                return None
        return "".join(parts)
    return None


def _normalize_messages(value: Any) -> list[dict[str, str]] | str:
    """The messages as ``[{"role", "content": str}]``, or a drop reason. Accepts OpenAI
    ``role``/``content`` (content may be a list of parts) and ShareGPT ``from``/``value``."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return "malformed"
    if not isinstance(value, (list, tuple)):
        return "malformed"
    out = []
    for msg in value:
        if not isinstance(msg, Mapping):
            return "malformed"
        role = msg.get("role") if msg.get("role") is not None else msg.get("from")
        content = msg.get("content") if "content" in msg and msg.get("content") is not None else msg.get("value")
        if not isinstance(role, str):
            return "malformed"
        text = _content_text(content)
        if text is None:
            return "non_text_content"
        out.append({"role": _ROLE_ALIASES.get(role, role), "content": text})
    return out


def _system(*parts: str | None) -> str | None:
    text = "\n\n".join(p for p in parts if p and p.strip())
    return text or None


def _chat(prompt: str, response: str | None, system: str | None) -> Example:
    if response is None or not response.strip():
        return _drop("empty_completion")
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
    system_prompt: str | None = None,
) -> Example:
    """Normalise one raw row (``fmt`` from ``detect_format``; ignored when templates are given).

    Templates (Transformer Lab's Data Template, Jinja over the row's columns): the rendered
    ``instruction_template`` is the system message (after ``system_prompt``), ``input_template``
    the user message, ``output_template`` the response. ``output_template`` alone: a text row."""
    if output_template:
        response = render_template(output_template, row, field_name="output_template")
        if not input_template and not instruction_template:
            return Example(kind="text", text=response) if response.strip() else _drop("empty")
        instruction = render_template(instruction_template, row, field_name="instruction_template") if instruction_template else ""
        prompt = render_template(input_template, row, field_name="input_template") if input_template else ""
        return _chat(prompt, response, _system(system_prompt, instruction))
    if input_template or instruction_template:
        raise ConfigError("input_template and instruction_template need an output_template too (the response to train on)")
    system = _system(system_prompt)

    if fmt == "text":
        text = _str(row.get("text"))
        return Example(kind="text", text=text) if text and text.strip() else _drop("empty")
    if fmt == "messages":
        raw = row.get("messages") if row.get("messages") is not None else row.get("conversations")
        if raw is None:
            return _drop("empty")
        msgs = _normalize_messages(raw)
        if isinstance(msgs, str):
            return _drop(msgs)
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        if last is None:
            return _drop("no_assistant_turn")
        if not msgs[last]["content"].strip():
            return _drop("empty_completion")
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
                text = _str(completion)
                tail = [{"role": "assistant", "content": text}] if text is not None else "empty_completion"
            for part in (msgs, tail):
                if isinstance(part, str):
                    return _drop(part)
            return row_to_example({"messages": msgs + tail}, "messages", system_prompt=system_prompt)
        prompt, completion = _str(prompt), _str(completion)
        if prompt is None:
            return _drop("empty")
        return _chat(prompt, completion, system)
    if fmt == "alpaca":
        instruction, inp, output = _str(row.get("instruction")), _str(row.get("input")), _str(row.get("output"))
        if instruction is None:
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
    system_prompt: str | None = None,
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
        system_prompt=system_prompt,
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
    eval_from: str  # "test split" | "validation split" | "10% holdout, seed 42" | "none" | "none (evaluation off)"
    dropped: dict[str, int]  # reason -> rows (train + eval)
    truncated: int  # rows cut by truncation="right"
    template_fallback: int  # rows where the chat-template prompt was not a token prefix
    mean_tokens: float  # over kept train rows
    max_tokens: int
    max_length: int | None
    dropped_at: dict[str, list[str]] = field(default_factory=dict)  # reason -> where the first such rows are

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
        parts = []
        for reason, count in sorted(self.dropped.items()):
            where = self.dropped_at.get(reason) or []
            more = ", ..." if count > len(where) else ""
            parts.append(f"{reason} {count}" + (f": {', '.join(where)}{more}" if where else ""))
        dropped = "; ".join(parts) or "none"
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


@dataclass
class DataPlan:
    """Everything about a dataset that is known without a tokenizer (``plan_datasets``): the rows
    of each split, their format and origin, the eval split's source, notes for the log."""

    source: str
    train: datasets.Dataset
    train_origins: RowOrigins
    fmt: str
    eval: datasets.Dataset | None
    eval_origins: RowOrigins | None
    eval_fmt: str
    eval_from: str
    templated: bool
    notes: list[str] = field(default_factory=list)


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
_DROP_EXAMPLES = 3  # rows named per drop reason in the summary


def _map_row(row: dict, index: int, origins: RowOrigins, **kwargs) -> dict[str, Any]:
    try:
        return tokenize_example(row, **kwargs)
    except DataError as exc:
        raise DataError(f"{origins.where(index)}: {exc}") from None


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
    ds: datasets.Dataset, name: str, origins: RowOrigins, tokenizer, fmt: str, num_proc: int, opts: dict
) -> tuple[datasets.Dataset, Counter, int, int, dict[str, list[str]]]:
    num_proc = num_proc if num_proc and num_proc > 1 and ds.num_rows > 1 else None
    if num_proc:
        num_proc = min(num_proc, ds.num_rows)
    mapped = ds.map(
        _map_row,
        cache_file_name=_cache_file_name(ds, name),
        with_indices=True,
        fn_kwargs={"origins": origins, "tokenizer": tokenizer, "fmt": fmt, **opts},
        remove_columns=ds.column_names,
        features=_FEATURES,
        num_proc=num_proc,
        desc=f"tokenizing {name}",
    )
    info = mapped.select_columns(["drop_reason", "truncated", "template_fallback"])[:]
    reasons = info["drop_reason"]
    dropped = Counter(r for r in reasons if r)
    dropped_at: dict[str, list[str]] = {}
    for i, r in enumerate(reasons):
        if r and len(dropped_at.setdefault(r, [])) < _DROP_EXAMPLES:
            dropped_at[r].append(origins.where(i))
    keep = [i for i, r in enumerate(reasons) if not r]
    truncated = sum(info["truncated"])
    fallback = sum(info["template_fallback"])
    kept = mapped.select(keep) if len(keep) != mapped.num_rows else mapped
    kept = kept.remove_columns(["drop_reason", "truncated", "template_fallback"])
    kept = kept.flatten_indices() if len(keep) != mapped.num_rows else kept
    kept = kept.add_column("sample_index", list(range(kept.num_rows)))
    return kept, dropped, truncated, fallback, dropped_at


def plan_datasets(
    source: str,
    *,
    input_template: str | None = None,
    output_template: str | None = None,
    instruction_template: str | None = None,
    seed: int = 42,
    split: str | None = None,
    eval_fraction: float = 0.1,
    evaluation: bool = True,
    token: str | None = None,
) -> DataPlan:
    """Find, load and check ``source`` without a tokenizer (so a missing or malformed dataset fails
    before any model is loaded): splits, row format (one per dataset; the file and line of the
    first row that differs), the Data Template against the columns, the eval split.

    ``evaluation=False`` (eval_strategy "no"): no eval rows at all, neither a split nor a holdout.
    An eval split of the dataset (``test``/``validation``, e.g. ``<name>_eval.jsonl``) is used as
    it is; rows are held out of train only when the dataset has none."""
    if not 0 <= eval_fraction < 1:
        raise ConfigError(f"eval_fraction must be in [0, 1), got {eval_fraction!r}")
    templates = {"instruction_template": instruction_template or None, "input_template": input_template or None,
                 "output_template": output_template or None}
    for name, tmpl in templates.items():
        if tmpl:
            _compile(tmpl, name)  # syntax errors surface before any work

    raw = open_dataset(source, split=split, token=token)
    train_raw, train_origins = raw.splits["train"], raw.origins["train"]
    try:
        detect_format(train_raw.column_names)
        has_format = True
    except DataError:
        has_format = False
    templated, note = plan_templates(templates, train_raw.column_names, source=source, has_format=has_format)
    notes = [note] if note else []
    fmt = "template" if templated else split_format(train_raw, train_origins, source)

    eval_name = next((n for n in EVAL_SPLITS if n in raw.splits), None)
    eval_raw = eval_origins = None
    eval_fmt = fmt
    if not evaluation:
        eval_from = "none (evaluation off)"
    elif eval_name is not None:
        eval_raw, eval_origins = raw.splits[eval_name], raw.origins[eval_name]
        eval_fmt = "template" if templated else split_format(eval_raw, eval_origins, source)
        eval_from = f"{eval_name} split"
    elif eval_fraction > 0 and train_raw.num_rows >= MIN_ROWS_FOR_HOLDOUT:
        n = train_raw.num_rows
        n_eval = max(1, math.ceil(eval_fraction * n))
        perm = np.random.default_rng(seed).permutation(n)
        eval_idx, train_idx = sorted(perm[:n_eval].tolist()), sorted(perm[n_eval:].tolist())
        eval_raw, eval_origins = train_raw.select(eval_idx), train_origins.select(eval_idx)
        train_raw, train_origins = train_raw.select(train_idx), train_origins.select(train_idx)
        eval_from = f"{eval_fraction:.0%} holdout, seed {seed}"
    else:
        eval_from = "none"

    if templated and train_raw.num_rows:  # render the first row here for a clean early error
        try:
            row_to_example(train_raw[0], fmt, **{k: v for k, v in templates.items()})
        except DataError as exc:
            raise DataError(f"{train_origins.where(0)}: {exc}") from None
    return DataPlan(source=source, train=train_raw, train_origins=train_origins, fmt=fmt, eval=eval_raw,
                    eval_origins=eval_origins, eval_fmt=eval_fmt, eval_from=eval_from, templated=templated,
                    notes=notes)


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
    system_prompt: str | None = None,
    num_proc: int = 1,
    seed: int = 42,
    split: str | None = None,
    eval_fraction: float = 0.1,
    evaluation: bool = True,
    token: str | None = None,
    plan: DataPlan | None = None,
    log: Callable[[str], Any] | None = print,
) -> PreparedData:
    """Load, format, tokenise and split ``source``; see the module docstring for the rules.
    ``plan``: the result of ``plan_datasets`` for the same arguments (not loaded again)."""
    if truncation not in TRUNCATION_MODES:
        raise ConfigError(f"truncation must be one of {TRUNCATION_MODES}, got {truncation!r}")
    if not isinstance(max_length, int) or max_length < 1:
        raise ConfigError(f"max_length must be a positive integer, got {max_length!r}")
    if plan is None:
        plan = plan_datasets(source, input_template=input_template, output_template=output_template,
                             instruction_template=instruction_template, seed=seed, split=split,
                             eval_fraction=eval_fraction, evaluation=evaluation, token=token)
    if log is not None:
        for note in plan.notes:
            log(note)
    opts = dict(
        max_length=max_length,
        truncation=truncation,
        mask_prompt_loss=mask_prompt_loss,
        input_template=(input_template or None) if plan.templated else None,
        output_template=(output_template or None) if plan.templated else None,
        instruction_template=(instruction_template or None) if plan.templated else None,
        system_prompt=system_prompt or None,
    )
    train_raw, eval_raw = plan.train, plan.eval
    rows_in = train_raw.num_rows + (eval_raw.num_rows if eval_raw is not None else 0)
    train, dropped, truncated, fallback, dropped_at = _tokenize_split(
        train_raw, "train", plan.train_origins, tokenizer, plan.fmt, num_proc, opts
    )
    eval_ds = None
    if eval_raw is not None:
        eval_ds, e_dropped, e_trunc, e_fallback, e_at = _tokenize_split(
            eval_raw, "eval", plan.eval_origins, tokenizer, plan.eval_fmt, num_proc, opts
        )
        dropped += e_dropped
        truncated += e_trunc
        fallback += e_fallback
        for reason, where in e_at.items():
            dropped_at[reason] = (dropped_at.get(reason, []) + where)[:_DROP_EXAMPLES]
        if eval_ds.num_rows == 0:
            eval_ds = None

    if train.num_rows == 0:
        reasons = "; ".join(
            f"{k} {v}" + (f": {', '.join(dropped_at[k])}" if dropped_at.get(k) else "") for k, v in sorted(dropped.items())
        )
        raise DataError(
            f"all {train_raw.num_rows} training rows of {source!r} were dropped ({reasons}): "
            f"they are empty, have an empty response, or have no trainable token after truncation to "
            f"max_length={max_length}"
            + (" (truncation='filter' drops rows longer than max_length)" if truncation == "filter" else "")
        )

    lengths = pc.list_value_length(train.with_format("arrow")[:]["input_ids"]).to_numpy()
    stats = DataStats(
        source=source,
        format=plan.fmt,
        rows_in=rows_in,
        train_rows=train.num_rows,
        eval_rows=eval_ds.num_rows if eval_ds is not None else 0,
        eval_from=plan.eval_from if eval_ds is not None or plan.eval is None else "none",
        dropped=dict(dropped),
        truncated=truncated,
        template_fallback=fallback,
        mean_tokens=float(np.mean(lengths)),
        max_tokens=int(max(lengths)),
        max_length=max_length,
        dropped_at=dropped_at,
    )
    if log is not None:
        log(stats.summary())
    return PreparedData(train=train, eval=eval_ds, stats=stats)
