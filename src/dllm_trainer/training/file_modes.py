"""Modes of the files we save: what a plain `open()` / `mkdir()` would give under the umask.

Some writers create files private to the owner: safetensors' `save_file` writes 0600 (its atomic
temporary file), `tempfile.mkdtemp` makes 0700 folders. Saved models, adaptors and checkpoints are
meant to be shared (a team's Transformer Lab workspace, a group-readable runs folder), so after
saving we give them the modes the umask allows: typically 0755 folders and 0644 files.
"""
from __future__ import annotations

import os
import stat


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_default_modes(path: str) -> None:
    """chmod `path` (a file, or a folder and everything under it) to 0777 (folders, executables) or
    0666 (other files) minus the umask. Files of other owners and links are left alone."""
    umask = current_umask()
    dir_mode, file_mode = 0o777 & ~umask, 0o666 & ~umask

    def fix(p: str, is_dir: bool) -> None:
        try:
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode) or st.st_uid != os.geteuid():
                return
            mode = dir_mode if is_dir or st.st_mode & 0o111 else file_mode
            if stat.S_IMODE(st.st_mode) != mode:
                os.chmod(p, mode)
        except OSError:
            pass  # best effort: never fail a save over a mode

    if not os.path.isdir(path) or os.path.islink(path):
        fix(path, False)
        return
    for root, dirs, files in os.walk(path):
        fix(root, True)
        for f in files:
            fix(os.path.join(root, f), False)
