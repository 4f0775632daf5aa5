"""Ray Tune's saved experiment state in a run folder, kept whole for --resume.

Ray copies its experiment state into the run folder in place, not by rename: a driver killed
during the copy leaves the files empty, and `--resume` would restore nothing. back_up_state
copies them aside when whole and changed (tuner._ray.BackUpState calls it after each of Ray's saves);
repair_state puts the copy back before a resume. Files only (pyarrow's filesystems, so a URI
storage too); no Ray.
"""

from __future__ import annotations

import fnmatch
import json
import os

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


class StateBackup:
    """Copies of Ray's state files in RUN_DIR/.state-backup/, taken only when they changed.

    Ray rewrites its whole state (every trial's JSON: 23 MB at 1,000 trials) when it saves,
    every 10 s or more, or when a trial's checkpoints force it. Copying and parsing all of it each
    time a trial ended made the backup grow with the trials already run; now the files are copied
    only when one of them changed since the copy taken last, so a backup costs at most one copy
    per save of Ray's. They are copied all together: a set from one save, never the searcher's
    state of one save beside the concurrency limiter's of the one before (seen: --resume then
    waited forever for a trial the limiter still counted as running). A change is told by size,
    time and, from the local staging folder, the inode: Ray saves two of the files by rename, and
    two saves within one tick of the kernel's coarse file clock can leave size and time alike.

    source: where the files are read. The run folder (default), where Ray's copy may be cut off,
    so each changed file is checked whole first; or Ray's own staging folder on the driver, which
    Ray writes whole in the driver's thread, the one that calls the callbacks (tuner._ray passes
    it), so no check is needed there."""

    def __init__(self, run_dir: str, source: str | None = None) -> None:
        self.run_dir, self.source = run_dir, source
        self.copied: dict[str, tuple[int, ...]] = {}  # file name -> _signature of the copy taken
        self.names: list[str] = []  # the state files' names, listed once: not a listing per call
        self.copies = 0  # how many times files were copied (tuner._ray.PruneCheckpoints waits for one)

    def update(self) -> bool:
        """Copy what changed; False when nothing could be copied (a damaged file: the last whole
        copy stays) or when the copy failed (a backup must never stop a search)."""
        fs, folder = filesystem(self.run_dir)
        try:
            source_fs, source = (pafs.LocalFileSystem(), self.source) if self.source else (fs, folder)
            files = self._files(source_fs, source)
            signatures = {f.base_name: self._signature(f) for f in files}
            changed = files if any(self.copied.get(n) != sig for n, sig in signatures.items()) else []
            if not files or (not self.source and not all(_whole(source_fs, f) for f in changed)):
                return False  # keep the last whole copy
            if changed:
                _copy_into(source_fs, changed, fs, f"{folder}/{STATE_BACKUP}")
                self.copied = signatures
                self.copies += 1
            return True
        except OSError:
            return False

    def _signature(self, info: pafs.FileInfo) -> tuple[int, ...]:
        if self.source:  # a local folder: the inode too
            stat = os.stat(info.path)
            return stat.st_size, stat.st_mtime_ns, stat.st_ino
        return info.size, info.mtime_ns

    def _files(self, fs: pafs.FileSystem, folder: str) -> list[pafs.FileInfo]:
        """The state files: by their names once known (a folder of 1,000 trials is not listed each
        step), listed again when one is gone or not all of them were there yet."""
        if len(self.names) >= len(STATE_FILES):
            infos = fs.get_file_info([f"{folder}/{name}" for name in self.names])
            if all(info.type == pafs.FileType.File for info in infos):
                return infos
        files = _state_files(fs, folder)
        self.names = [info.base_name for info in files]
        return files


def _copy_into(source_fs: pafs.FileSystem, files: list[pafs.FileInfo], fs: pafs.FileSystem, backup: str) -> None:
    """One save's set, whole or not at all: copied into a folder of its own, then swapped in by
    rename (a kill during a file-by-file copy once left a newer experiment state beside an older
    searcher state, and the resumed search failed on a trial the searcher had never drawn)."""
    fresh, old = f"{backup}.new", f"{backup}.old"
    for folder in (fresh, old):
        _delete_dir(fs, folder)
    fs.create_dir(fresh)
    for info in files:
        pafs.copy_files(info.path, f"{fresh}/{info.base_name}", source_filesystem=source_fs,
                        destination_filesystem=fs)
    if fs.get_file_info(backup).type == pafs.FileType.Directory:
        fs.move(backup, old)
    fs.move(fresh, backup)  # a kill before this line leaves the old set in backup.old: repair_state reads it
    _delete_dir(fs, old)


def _delete_dir(fs: pafs.FileSystem, folder: str) -> None:
    if fs.get_file_info(folder).type == pafs.FileType.Directory:
        fs.delete_dir(folder)


def back_up_state(run_dir: str) -> bool:
    """A whole copy of the run folder's state files, if they are whole (StateBackup, once)."""
    return StateBackup(run_dir).update()


def repair_state(run_dir: str) -> str | None:
    """Before --resume: if Ray's state files in the run folder are damaged, put back the copy
    taken after Ray's last whole save. Returns what was done, or None when nothing was damaged;
    raises ClusterError when they are damaged and there is no whole copy."""
    fs, folder = filesystem(run_dir)
    damaged = [info for info in _state_files(fs, folder) if not _whole(fs, info)]
    if not damaged:
        return None
    copies = _state_files(fs, f"{folder}/{STATE_BACKUP}") or _state_files(fs, f"{folder}/{STATE_BACKUP}.old")
    if not copies or not all(_whole(fs, c) for c in copies):
        raise ClusterError(f"--resume: Ray's saved state in {run_dir} is damaged ({damaged[0].base_name} is cut off: "
                           "the search was stopped while saving it) and there is no whole copy; run the search "
                           "again without --resume, under a new --name to keep these trials' folders")
    for info in damaged:
        fs.delete_file(info.path)
    for copy in copies:
        fs.copy_file(copy.path, f"{folder}/{copy.base_name}")
    return (f"--resume: Ray's saved state was cut off ({len(damaged)} files); restored the copy taken "
            "after its last whole save (the trials that ended after it are drawn and run again)")
