"""An exclusive lock on an output folder: one writing run at a time, stale locks taken over.

    with FolderLock("/tmp/run", log=print):   # LockError (one line, naming the holder) if held
        ...                                   # write into /tmp/run

The lock is the file ``DIR/.lock``: JSON {"pid", "host", "started", "argv"} of the holder. It is
created atomically (a complete temporary file hard-linked to the lock name, which fails if the
name exists), so no reader ever sees half a lock. A lock whose holder ran on this host and is no
longer alive is stale: it is taken over with a message. A lock of another host cannot be checked
from here: the error names it and the file to remove if that run is gone.

The folder (and missing parents) is created on entry, so an unwritable location fails at once;
on exit the lock is removed, and so is every folder created on entry that is still empty.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import sys
import time
from typing import Callable

LOCK_FILE = ".lock"


class LockError(RuntimeError):
    """The folder is locked by another run or cannot be created; the message is one line."""


def pid_alive(pid: int) -> bool:
    """True if a process ``pid`` exists on this host (also one of another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError):
        return False
    return True


def _read(path: pathlib.Path) -> dict | None:
    """The holder recorded in a lock file; None if it vanished; {} if it is not a lock."""
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else {}


def describe(holder: dict) -> str:
    """"pid 123 on host h (since 2025-01-01 12:00:00)"."""
    since = holder.get("started")
    when = f" (since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))})" \
        if isinstance(since, (int, float)) else ""
    return f"pid {holder.get('pid')} on host {holder.get('host')}{when}"


class FolderLock:
    """Context manager holding ``folder/.lock`` for this process (see the module docstring).

    what: how errors name the folder (e.g. "--output_dir"); log: where a takeover is reported.
    """

    def __init__(self, folder, what: str = "folder", log: Callable[[str], None] | None = None):
        self.folder = pathlib.Path(folder).expanduser()
        self.path = self.folder / LOCK_FILE
        self.what = what
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self._created: list[pathlib.Path] = []
        self._held = False

    def _make_folder(self) -> None:
        missing = []
        p = self.folder.absolute()
        while not p.exists() and p != p.parent:
            missing.append(p)
            p = p.parent
        if p.exists() and not p.is_dir():
            raise LockError(f"cannot create {self.what} {self.folder}: {p} is not a folder")
        for p in reversed(missing):
            try:
                p.mkdir()
            except FileExistsError:
                continue
            except OSError as e:
                raise LockError(f"cannot create {self.what} {self.folder}: "
                                f"{e.strerror or e} ({p})") from None
            self._created.append(p)
        if not self.folder.is_dir():
            raise LockError(f"{self.what} {self.folder} exists and is not a folder")

    def acquire(self) -> "FolderLock":
        """Takes the lock (creating the folder); LockError naming the holder if it is held."""
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
              "argv": sys.argv}
        tmp = self.folder / f"{LOCK_FILE}.{me['host']}.{me['pid']}.tmp"
        try:
            self._make_folder()
            try:
                tmp.write_text(json.dumps(me) + "\n", encoding="utf-8")
            except OSError as e:
                raise LockError(f"cannot write in {self.what} {self.folder}: "
                                f"{e.strerror or e}") from None
            for _ in range(5):
                try:
                    os.link(tmp, self.path)
                    self._held = True
                    return self
                except FileExistsError:
                    pass
                holder = _read(self.path)
                if holder is None:
                    continue  # released meanwhile: try again
                if not holder:
                    raise LockError(f"{self.what} {self.folder} has a lock file {self.path} that "
                                    "is not a lock of this program; remove it if no run uses "
                                    "the folder")
                if holder.get("host") != me["host"] or pid_alive(int(holder["pid"])) or \
                        holder["pid"] == me["pid"]:
                    raise LockError(f"{self.what} {self.folder} is in use by {describe(holder)}; "
                                    f"wait for that run to end (if it is gone, remove {self.path})")
                self._take_over(holder)
            raise LockError(f"cannot lock {self.what} {self.folder}: the lock {self.path} keeps "
                            "changing; is another run starting there?")
        finally:
            if tmp.parent.is_dir():
                tmp.unlink(missing_ok=True)
            if not self._held:
                self._remove_created()

    def _take_over(self, holder: dict) -> None:
        """Moves a stale lock aside; puts it back if it was replaced by a live one meanwhile."""
        aside = self.path.with_name(f"{LOCK_FILE}.stale.{os.getpid()}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return
        moved = _read(aside)
        if moved != holder:  # another run took over first and its lock was moved: give it back
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            raise LockError(f"{self.what} {self.folder} is in use by "
                            f"{describe(moved or {})}; wait for that run to end")
        aside.unlink(missing_ok=True)
        self.log(f"taking over the lock of {describe(holder)} on {self.folder}: that process no "
                 "longer exists")

    def release(self) -> None:
        """Removes the lock if this process holds it, then the folders ``acquire`` created if
        they are empty."""
        if self._held and _read(self.path) is not None and \
                _read(self.path).get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self._held = False
        self._remove_created()

    def _remove_created(self) -> None:
        for p in reversed(self._created):
            try:
                p.rmdir()  # only if empty
            except OSError:
                break
        self._created = []

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
