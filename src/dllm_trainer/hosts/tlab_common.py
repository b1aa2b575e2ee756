"""What both Transformer Lab hosts share: the SDK's async calls from our synchronous code, the
workspace's model and dataset folders, team secrets and the "resume from checkpoint" lookup.

Both app generations keep uploaded or downloaded models as `<workspace>/models/<id>/` and datasets
as `<workspace>/datasets/<id>/`, each with an index.json: models hold the weights beside it (or
name a `local_path`), datasets say where the data is (`location`: `local` = the folder's files,
`huggingface` = a Hub id). The current app (SDK 0.1.x) also publishes registry models as
`<workspace>/models/<group>/<version>/`.
"""
from __future__ import annotations

import asyncio
import json
import math
import os

from ..errors import ModelError


def run_sdk(coro):
    """Run one SDK coroutine from our synchronous code (the SDK's own helper when present)."""
    try:
        from lab.lab_facade import _run_async  # same event-loop handling as the SDK's sync methods

        return _run_async(coro)
    except ImportError:  # pragma: no cover - other SDK layouts
        return asyncio.run(coro)


def secure_name(name: str) -> str:
    from werkzeug.utils import secure_filename  # the app's own rule for folder names

    return secure_filename(name)


def clean_scalars(metrics: dict) -> dict:
    """JSON-safe numbers only (the app's UI parses them; NaN is not valid JSON)."""
    out = {}
    for k, v in (metrics or {}).items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if isinstance(v, float) and not math.isfinite(v):
            continue
        out[k] = v
    return out


class WorkspaceHost:
    """Workspace names, secrets and resume lookup; subclasses set `self.sdk` (the `lab` facade) and
    `self.workspace` (the workspace folder, or a remote URI where nothing resolves locally)."""

    sdk = None
    workspace: str | None = None
    grouped_model_ids = False  # '<group>/<version>' registry ids (current app only)

    def _entry(self, kind: str, name: str) -> str | None:
        """<workspace>/<kind>/<name>/ when it holds an index.json (also for the app's 'TransformerLab/<id>' ids)."""
        name = (name or "").strip()
        if not name or not isinstance(self.workspace, str) or "://" in self.workspace:
            return None
        root = os.path.join(self.workspace, kind)
        candidates: list[str] = []
        for cand in (name, name.split("/", 1)[1] if name.startswith("TransformerLab/") else None, secure_name(name)):
            if cand and cand not in candidates and "/" not in cand and cand not in (".", ".."):
                candidates.append(cand)
        if kind == "models" and self.grouped_model_ids and "/" in name:
            parts = [secure_name(p) for p in name.split("/")]
            if all(parts):
                candidates.append(os.path.join(*parts))
        for cand in candidates:
            d = os.path.join(root, cand)
            if os.path.isfile(os.path.join(d, "index.json")):
                return d
        return None

    @staticmethod
    def _index(folder: str) -> dict:
        try:
            with open(os.path.join(folder, "index.json"), encoding="utf-8") as fh:
                data = json.load(fh)
            return data if isinstance(data, dict) else {}
        except (OSError, json.JSONDecodeError):
            return {}

    def resolve_model(self, name: str) -> str | None:
        """A workspace model's weights folder, or None when `name` is not a workspace model.

        `name` is a model id (`<workspace>/models/<id>/index.json`) or, as the v0.30 Train tab sends
        it for a model imported with the app's local import, that folder's path: its index.json
        holds only metadata, and `json_data.source_id_or_path` / `json_data.model_filename` name the
        folder with the weights (outside `models/`)."""
        folder = self._entry("models", name)
        if folder is None:
            path = os.path.expanduser((name or "").strip())
            if not (os.path.isdir(path) and os.path.isfile(os.path.join(path, "index.json"))
                    and not os.path.isfile(os.path.join(path, "config.json"))):
                return None
            folder = path
        if os.path.isfile(os.path.join(folder, "config.json")):
            return folder
        info = self._index(folder)
        jd = info.get("json_data") if isinstance(info.get("json_data"), dict) else {}
        recorded = []
        for key in ("source_id_or_path", "model_filename", "local_path", "model_path"):
            for src in (jd, info):
                p = src.get(key)
                if isinstance(p, str) and p.strip():
                    p = os.path.join(folder, os.path.expanduser(p.strip()))  # "." is the folder itself
                    recorded.append(p)
                    if os.path.isfile(os.path.join(p, "config.json")):
                        return os.path.abspath(p)
        if str(jd.get("source") or "").lower() == "local" and recorded:
            raise ModelError(
                f"workspace model '{name}' ({os.path.join(folder, 'index.json')}) points to {recorded[0]}, "
                "which is not a model folder (no config.json); import the model again or pick another one"
            )
        return None  # an index without weights (e.g. a Hub model the app knows): use the name as a Hub id

    def resolve_dataset(self, name: str) -> str | None:
        """A workspace dataset: its folder when `location` is local, its Hub id when huggingface; None if not one."""
        folder = self._entry("datasets", name)
        if folder is None:
            return None
        info = self._index(folder)
        location = str(info.get("location") or "").strip().lower()
        if location == "local":
            return folder
        if location == "huggingface":
            return str(info.get("dataset_id") or name)
        # no location recorded: a folder holding data files is local data
        data_files = [f for f in os.listdir(folder) if f.lower() != "index.json"
                      and os.path.splitext(f)[1].lower() in (".json", ".jsonl", ".csv", ".parquet", ".arrow")]
        return folder if data_files else name

    def missing_dataset_hint(self, name: str) -> str | None:
        """For a dataset name that is neither a workspace dataset nor a local path: what the workspace has."""
        if self._entry("datasets", name) is not None or not isinstance(self.workspace, str) or "://" in self.workspace:
            return None
        root = os.path.join(self.workspace, "datasets")
        try:
            have = sorted(e.name for e in os.scandir(root) if os.path.isfile(os.path.join(e.path, "index.json")))
        except OSError:
            have = []
        return f"'{name}' is not a dataset of the Transformer Lab workspace ({root}: {', '.join(have) if have else 'none'})"

    def secret(self, name: str) -> str | None:
        try:
            value = self.sdk.get_secret(name)
        except Exception:  # noqa: BLE001
            return None
        return value or None

    def checkpoint_to_resume(self) -> str | None:
        """The checkpoint the app asks this job to resume from ("resume from checkpoint" in the UI)."""
        try:
            path = self.sdk.get_checkpoint_to_resume()
        except Exception:  # noqa: BLE001
            return None
        if not path:
            return None
        real = os.path.realpath(path)
        return real if os.path.isdir(real) else None
