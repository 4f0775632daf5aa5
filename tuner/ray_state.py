"""Ray Tune's saved experiment state in a run folder, kept whole for --resume.

Ray copies its experiment state into the run folder in place, not by rename: a driver killed
during the copy leaves the files empty, and `--resume` would restore nothing. back_up_state
copies them aside when whole (tuner._ray.BackUpState calls it each time a trial ends);
repair_state puts the copy back before a resume. Files only (pyarrow's filesystems, so a URI
storage too); no Ray.
"""

from __future__ import annotations

import fnmatch
import json

import pyarrow.fs as pafs

from .errors import ClusterError
from .storage import filesystem

STATE_FILES = ("experiment_state-*.json", "search_gen_state-*.json", "searcher-state-*.pkl")
STATE_BACKUP = ".state-backup"


def _state_files(fs: pafs.FileSystem, folder: str) -> list[pafs.FileInfo]:
    infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    return [i for i in infos if i.type == pafs.FileType.File
            and any(fnmatch.fnmatch(i.base_name, pattern) for pattern in STATE_FILES)]


def _whole(fs: pafs.FileSystem, info: pafs.FileInfo) -> bool:
    """Not empty, and the experiment state parses as JSON (search_gen_state-*.json is a pickle
    despite its name): what a copy cut off half-way is not."""
    if not info.size:
        return False
    if info.base_name.startswith("experiment_state-"):
        with fs.open_input_stream(info.path) as stream:
            try:
                json.loads(stream.read())
            except ValueError:
                return False
    return True


def back_up_state(run_dir: str) -> bool:
    fs, folder = filesystem(run_dir)
    backup = f"{folder}/{STATE_BACKUP}"
    try:
        files = _state_files(fs, folder)
        if not files or not all(_whole(fs, f) for f in files):
            return False  # keep the last whole copy
        fs.create_dir(backup)
        for info in files:  # copy, then rename: a backup is never half-written either
            fs.copy_file(info.path, f"{backup}/.{info.base_name}.tmp")
            fs.move(f"{backup}/.{info.base_name}.tmp", f"{backup}/{info.base_name}")
        names = {info.base_name for info in files}
        for stale in _state_files(fs, backup):
            if stale.base_name not in names:
                fs.delete_file(stale.path)
        return True
    except OSError:  # a backup must never stop a search
        return False


def repair_state(run_dir: str) -> str | None:
    """Before --resume: if Ray's state files in the run folder are damaged, put back the copy
    taken when a trial last ended. Returns what was done, or None when nothing was damaged;
    raises ClusterError when they are damaged and there is no whole copy."""
    fs, folder = filesystem(run_dir)
    damaged = [info for info in _state_files(fs, folder) if not _whole(fs, info)]
    if not damaged:
        return None
    copies = _state_files(fs, f"{folder}/{STATE_BACKUP}")
    if not copies or not all(_whole(fs, c) for c in copies):
        raise ClusterError(f"--resume: Ray's saved state in {run_dir} is damaged ({damaged[0].base_name} is cut off: "
                           "the search was stopped while saving it) and there is no whole copy; run the search "
                           "again without --resume, under a new --name to keep these trials' folders")
    for info in damaged:
        fs.delete_file(info.path)
    for copy in copies:
        fs.copy_file(copy.path, f"{folder}/{copy.base_name}")
    return (f"--resume: Ray's saved state was cut off ({len(damaged)} files); restored the copy taken when a "
            "trial last ended (the trials that ended after it are drawn and run again)")
