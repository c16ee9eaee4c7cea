"""The workdir of a run: checked before anything is written, locked while a run uses it.

Layout: config.json (the resolved config), metrics.jsonl, tensorboard/, checkpoints/<step>/, and
while a run trains, `lock` (the process id and host of the run holding it). Checkpoints found
unreadable when a run resumes are moved to unreadable_checkpoints/<step>/, kept for inspection
and out of the way of the steps the resumed run saves again.
"""

import contextlib
import fcntl
import json
import os
import socket
import sys
from pathlib import Path

from fwpzoo.config import Config, ConfigError, differing_keys, from_dict, to_dict

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
LOCK_FILE = "lock"
UNREADABLE_DIR = "unreadable_checkpoints"
# what a run writes, and whether it is a folder (metrics.jsonl and tensorboard/: metrics.py)
ENTRIES = {
    CONFIG_FILE: False,
    CHECKPOINT_DIR: True,
    LOCK_FILE: False,
    UNREADABLE_DIR: True,
    "metrics.jsonl": False,
    "tensorboard": True,
}


def check_path(workdir: Path) -> None:
    """ConfigError unless `workdir` is, or can be made, a writable folder."""
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"workdir {workdir} is a file, not a folder")
    existing = next(p for p in (workdir, *workdir.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"workdir {workdir} cannot be made: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"workdir {workdir} is not writable: no write permission on {existing}")
    for name, folder in ENTRIES.items():
        path = workdir / name
        if path.exists() and path.is_dir() != folder:
            kind = "a folder" if folder else "a file"
            raise ConfigError(f"{path} should be {kind}; move it out of the workdir")
    for path in (workdir, *(workdir / name for name in ENTRIES)):
        if path.exists():
            try_writing(path)


def try_writing(path: Path) -> None:
    """ConfigError unless a run can write `path` (a folder: add a file to it; a file: append).
    Tried rather than read from the mode bits, which pass for root even where a write fails (an
    immutable file, a read-only mount); nothing is changed."""
    try:
        if path.is_dir():
            probe = path / f".write-probe-{os.getpid()}"
            probe.touch()
            probe.unlink()
        else:
            with open(path, "a"):
                pass
    except OSError as error:
        raise ConfigError(f"{path} is not writable ({error.strerror}); a run writes it") from None


def stored_config(workdir: Path) -> Config | None:
    path = workdir / CONFIG_FILE
    if not path.exists():
        return None
    try:
        return from_dict(Config, json.loads(path.read_text()))
    except (OSError, ValueError) as error:  # ValueError: bad JSON, or a ConfigError
        raise ConfigError(f"{path} is not a readable config: {error}") from None


def refuse_different(stored: Config, cfg: Config, where: Path) -> None:
    """ConfigError naming the keys, unless `stored` and `cfg` differ in run length at most."""
    keys = differing_keys(stored, cfg)
    if keys:
        raise ConfigError(
            f"{where} holds a run with a different config; differing keys: {', '.join(keys)}"
        )


def write_config(workdir: Path, cfg: Config) -> None:
    """config.json, replaced in one rename so a crash never leaves half a file."""
    text = json.dumps(to_dict(cfg), indent=2, allow_nan=False) + "\n"
    partial = workdir / f".{CONFIG_FILE}.partial"
    partial.write_text(text)
    partial.replace(workdir / CONFIG_FILE)


def set_aside(workdir: Path, steps: list[int]) -> Path:
    """Moves checkpoints `steps` to unreadable_checkpoints/; the folder they went to."""
    target = workdir / UNREADABLE_DIR
    target.mkdir(exist_ok=True)
    for step in steps:
        destination, copy = target / str(step), 1
        while destination.exists():  # the same step may go bad twice
            destination, copy = target / f"{step}.{copy}", copy + 1
        (workdir / CHECKPOINT_DIR / str(step)).rename(destination)
    return target


class WorkdirLock(contextlib.AbstractContextManager):
    """An exclusive flock on workdir/lock while a run trains into workdir (created if missing).

    The kernel drops a flock when its process dies, however it dies, so the file a killed run
    leaves behind is stale by construction and the next run simply takes it. A run that finishes
    deletes the file; one that opened it just before re-checks the inode it locked and retries.
    """

    def __init__(self, workdir: Path):
        self.path = workdir / LOCK_FILE
        self.fd = None
        try:
            workdir.mkdir(parents=True, exist_ok=True)
            while self.fd is None:
                self.fd = self._try_lock()
        except OSError as error:
            raise ConfigError(f"cannot write to workdir {workdir}: {error.strerror}") from None

    def _try_lock(self) -> int | None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(
                f"workdir {self.path.parent} is in use by another run (process {owner}); "
                "wait for it to end or stop it"
            ) from None
        try:
            same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            same_file = False
        if not same_file:  # the holder released and deleted it between our open and lock
            os.close(fd)
            return None
        stale = os.read(fd, 200).decode(errors="replace").strip()
        if stale:
            print(f"fwpzoo: taking over the stale lock of process {stale}", file=sys.stderr)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        return fd

    def __exit__(self, *exc_info):
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
