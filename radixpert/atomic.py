"""Atomic, locked builds of folders and large files (torch-free, POSIX).

Every build of a target ``X`` (a bundle, a checkpoint, a cached model) follows one protocol:

1. take an exclusive advisory lock (``fcntl.flock``) on the sibling file ``X.lock``; a second
   process waits there, saying so once, and then finds the finished ``X``;
2. under the lock, delete leftovers of builds that died (``X.partial-*``, ``X.old-*``): only a
   lock holder makes them, so any that exist while we hold the lock are dead;
3. build into ``X.partial-<pid>-<random>``, unique per process, so no process ever deletes
   another's work;
4. fsync it, then move it in: a file with one ``os.replace``; a folder by renaming an old ``X``
   aside, renaming the new one in and only then deleting the old one.

``X`` is therefore either absent or complete; a build killed at any point leaves at worst a
stale partial that the next build removes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

Notify = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def lock_path(target: Path) -> Path:
    return target.with_name(target.name + ".lock")


@contextlib.contextmanager
def file_lock(target: str | Path, notify: Notify | None = None, what: str | None = None) -> Iterator[None]:
    """Hold the exclusive build lock of ``target`` (blocking; says once when it has to wait).

    The lock file is removed by its holder on release. A waiter that then wins the lock on the
    removed file notices (its inode no longer matches the path) and locks the new file instead,
    so two processes never both believe they hold it.
    """
    target = Path(target)
    path = lock_path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    told = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not told:
                    (notify or _stderr)(f"waiting for another process building {what or target}")
                    told = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            break
        os.close(fd)  # we locked a lock file its holder had already removed: take the current one
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)


def partial_path(target: str | Path) -> Path:
    """A fresh sibling name for building ``target``: unique per process and call."""
    target = Path(target)
    return target.with_name(f"{target.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")


def remove_stale(target: str | Path) -> None:
    """Delete leftovers of dead builds of ``target``; call only while holding its lock."""
    target = Path(target)
    if not target.parent.is_dir():
        return
    for pattern in (f"{target.name}.partial-*", f"{target.name}.old-*"):
        for leftover in target.parent.glob(pattern):
            remove(leftover)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _fsync_path(path: Path, directory: bool) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Flush a file, or every file and folder under a folder, to disk (before it is renamed in)."""
    if path.is_symlink():
        return
    if not path.is_dir():
        _fsync_path(path, directory=False)
        return
    for folder, _, names in os.walk(path):
        for name in names:
            child = Path(folder) / name
            if not child.is_symlink():
                _fsync_path(child, directory=False)
        _fsync_path(Path(folder), directory=True)


def commit(partial: str | Path, target: str | Path) -> Path:
    """Move a finished build in place of ``target`` (hold the lock); returns ``target``."""
    partial, target = Path(partial), Path(target)
    fsync_tree(partial)
    if partial.is_dir() and target.exists():
        # A folder cannot replace a folder in one rename: move the old one aside first, so
        # ``target`` is only ever missing for the instant between two renames, never half built.
        old = target.with_name(f"{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
        target.rename(old)
        partial.rename(target)
        _fsync_path(target.parent, directory=True)
        remove(old)
    else:
        os.replace(partial, target)
        _fsync_path(target.parent, directory=True)
    return target


@contextlib.contextmanager
def atomic_build(target: str | Path, notify: Notify | None = None, what: str | None = None) -> Iterator[Path]:
    """Lock ``target``, yield a fresh partial path to build into, and commit it on success.

    The partial path does not exist yet: create a folder or write a file there. On any error
    (or interrupt) the partial is removed and ``target`` is left as it was.
    """
    target = Path(target)
    with file_lock(target, notify=notify, what=what):
        remove_stale(target)
        partial = partial_path(target)
        try:
            yield partial
        except BaseException:
            remove(partial)
            raise
        commit(partial, target)


def build_once(target: str | Path, build: Callable[[Path], object], done: Callable[[Path], bool] | None = None,
               notify: Notify | None = None, what: str | None = None) -> Path:
    """``target``, built by ``build(partial)`` unless it is already complete.

    ``done(target)`` says whether an existing target is complete (default: it exists). A process
    that waited on another's build checks again under the lock and uses that build.
    """
    target = Path(target)
    complete = done or (lambda path: path.exists())
    if complete(target):
        return target
    with file_lock(target, notify=notify, what=what):
        if complete(target):
            return target
        remove_stale(target)
        partial = partial_path(target)
        try:
            build(partial)
        except BaseException:
            remove(partial)
            raise
        return commit(partial, target)
