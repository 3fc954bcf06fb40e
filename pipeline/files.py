"""Small file primitives the run's writers share: atomic text writes, ``flock`` locks, file keys, and the
per-machine cache directory."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
from pathlib import Path


def atomic_write_text(path: Path, text: str, fsync: bool = False) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it over ``path``: a reader sees the old
    content or the new, never half. ``fsync``: also force it to disk first (for files whose presence means
    "done", which an empty file after a crash must not imitate). The temporary name is the writer's own (host and
    pid), so concurrent writers of the same file (ranks on a shared filesystem) never write into each other's."""
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}-{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def locked(path: Path, blocking: bool = True):
    """Hold an exclusive ``flock`` on ``path`` (created if needed); yields False if busy and not blocking. On a
    filesystem without flock (some Lustre/NFS mounts) it goes on unlocked."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        except OSError:
            pass
        yield True
    finally:
        os.close(fd)


def files_key(root: Path, pattern: str = "*") -> str:
    """A short hash of the names (relative to ``root``), sizes and modification times of the files under ``root``
    that match ``pattern``: it changes when any of them is rewritten, added or removed."""
    files = sorted(f for f in root.rglob(pattern) if f.is_file())
    return hashlib.sha256(json.dumps([(str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns)
                                      for f in files]).encode()).hexdigest()[:16]


def cache_dir() -> Path:
    """Where built-in assets are materialised (the tiny model, SmolLM2, converted data): ``$LORAPLUS_CACHE`` or
    ``~/.cache/loraplus``."""
    return Path(os.environ.get("LORAPLUS_CACHE", Path.home() / ".cache" / "loraplus")).expanduser()
