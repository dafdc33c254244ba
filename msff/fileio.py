"""Files are promises: atomic writes that respect the umask, clear full-disk errors, run-folder
locks and the clean-up of temporaries left by killed processes.

Every temporary file or folder msff creates beside a target is named
``.<target name>.msff-<host>-<pid>-<random><suffix>``, so a later run can tell whose it is: one
whose process is gone (same host) is stale and is removed by :func:`clean_stale_temporaries`.

Example:
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> atomic_write_bytes(d / "a.json", b"{}")
    >>> (d / "a.json").read_bytes()
    b'{}'
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional

__all__ = [
    "DiskFullError",
    "FolderLockedError",
    "RunLock",
    "atomic_write_bytes",
    "clean_stale_temporaries",
    "current_umask",
    "dir_mode",
    "disk_full_guard",
    "file_mode",
    "free_bytes",
    "make_temp_dir",
    "make_temp_file",
    "pid_alive",
    "publish_file",
    "publish_dir",
]

_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
#: Temporaries of the older naming scheme (no owner in the name) are removed once this old.
LEGACY_STALE_S = 3600.0


class DiskFullError(OSError):
    """The file system ran out of space (or quota) while writing ``path``; nothing was left behind.

    ``str(e)`` is one line naming the path, the space needed and the space free.
    """

    def __init__(self, path: str | os.PathLike, needed: Optional[int] = None, free: Optional[int] = None):
        self.path, self.needed, self.free = Path(path), needed, free
        need = f"about {_human(needed)} needed" if needed else "more space needed"
        have = f", {_human(free)} free" if free is not None else ""
        super().__init__(errno.ENOSPC, f"no space left on device writing {path} ({need}{have}); "
                                       "free some space or write elsewhere")
        self.filename = str(path)

    def __str__(self) -> str:
        return self.strerror


class FolderLockedError(RuntimeError):
    """Another live process holds the lock of a run folder."""


def _human(n: Optional[int]) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


# ---- permissions --------------------------------------------------------------------------------
def current_umask() -> int:
    """The process umask, read without changing it (Linux ``/proc``; elsewhere set and restored)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Mode of an ordinary new file under the current umask (``0o666 & ~umask``)."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """Mode of an ordinary new folder under the current umask (``0o777 & ~umask``)."""
    return 0o777 & ~current_umask()


# ---- owners -------------------------------------------------------------------------------------
def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def _owner_tag() -> str:
    return f"msff-{_host()}-{os.getpid()}-"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host and is not a zombie."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return True


# ---- temporaries and publishing -----------------------------------------------------------------
def make_temp_file(target: str | os.PathLike, suffix: str = ".tmp") -> Path:
    """Create an empty temporary file beside ``target`` (same file system: renaming is atomic),
    named with this process as its owner. The caller publishes it with :func:`publish_file`."""
    target = Path(target)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.{_owner_tag()}", suffix=suffix, dir=target.parent or ".")
    os.close(fd)
    return Path(name)


def make_temp_dir(target: str | os.PathLike, suffix: str = ".tmp") -> Path:
    """Create a temporary folder beside ``target`` with the umask's folder mode (``mkdtemp`` makes
    0700). The caller moves it into place with :func:`publish_dir`."""
    target = Path(target)
    name = tempfile.mkdtemp(prefix=f".{target.name}.{_owner_tag()}", suffix=suffix, dir=target.parent or ".")
    os.chmod(name, dir_mode())
    return Path(name)


def publish_file(tmp: str | os.PathLike, target: str | os.PathLike) -> None:
    """Give ``tmp`` ordinary permissions (``mkstemp`` makes 0600) and rename it onto ``target``."""
    os.chmod(tmp, file_mode())
    os.replace(tmp, target)


def publish_dir(tmp: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move folder ``tmp`` onto ``target``, replacing an existing ``target`` folder only after the
    new one is complete (the old one is moved aside first and removed last)."""
    tmp, target = Path(tmp), Path(target)
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.{_owner_tag()}", suffix=".old", dir=target.parent))
        os.rmdir(old)
        target.rename(old)
        try:
            tmp.rename(target)
        except BaseException:
            old.rename(target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(target)


def free_bytes(path: str | os.PathLike) -> Optional[int]:
    """Free bytes on the file system holding ``path`` (or its nearest existing parent)."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def _is_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in _FULL_ERRNOS


@contextlib.contextmanager
def disk_full_guard(path: str | os.PathLike, needed: Optional[int] = None) -> Iterator[None]:
    """Turn a full-disk failure inside the block into one :class:`DiskFullError` naming ``path``.

    An ``OSError`` with ENOSPC/EDQUOT is always converted. Libraries that hide the errno (torch's
    ``file write failed``, GDAL's ``Write failed``) raise other errors; those are converted only
    when the file system really has less than ``needed`` bytes (at least 1 MB) free afterwards;
    any other error passes unchanged.
    """
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:  # a full disk shows as OSError, GDAL or numpy errors; all others re-raised below
        free = free_bytes(path)
        if _is_full(e) or (free is not None and free < max(needed or 0, 1 << 20)):
            raise DiskFullError(path, needed, free) from e
        raise


def _unlink_quiet(p: Path) -> None:
    try:
        p.unlink()
    except FileNotFoundError:
        pass


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through an owned temporary file beside it, ``fsync`` and rename.

    The file gets the umask's ordinary mode. A full disk raises :class:`DiskFullError` (naming
    ``path``, the bytes needed and free) and leaves neither the temporary nor a partial ``path``.
    """
    path = Path(path)
    with disk_full_guard(path, len(data)):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = make_temp_file(path)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            publish_file(tmp, path)
        finally:
            _unlink_quiet(tmp)


# ---- stale temporaries --------------------------------------------------------------------------
def _owned_pattern(name: str) -> re.Pattern:
    return re.compile(r"^\." + re.escape(name) + r"\.msff-(?P<host>[A-Za-z0-9._]+)-(?P<pid>\d+)-[a-z0-9_]{8}(?P<suffix>.*)$")


def _legacy_pattern(name: str) -> re.Pattern:
    # mkstemp/mkdtemp names of earlier versions: ".<name>.<8 random chars><suffix>"
    return re.compile(r"^\." + re.escape(name) + r"\.[a-z0-9_]{8}(?P<suffix>\.part\.tif|\.cog\.tif|\.probe|\.tmp|)(\.aux\.xml)?$")


def _remove(p: Path) -> bool:
    try:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
        return True
    except FileNotFoundError:
        return False


def clean_stale_temporaries(target: str | os.PathLike, legacy_age_s: float = LEGACY_STALE_S) -> list[Path]:
    """Remove temporaries of ``target`` (files or folders beside it named after it) whose owner
    process is gone.

    Only names of the owned pattern ``.<name>.msff-<host>-<pid>-…`` with this host and a dead pid
    are removed, plus unowned temporaries of earlier versions (``.<name>.<8 chars>.part.tif`` …)
    not modified for ``legacy_age_s`` seconds. Temporaries of live processes and of other hosts
    are left alone.

    Returns:
        The paths removed.
    """
    target = Path(target)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        return []
    owned, legacy = _owned_pattern(target.name), _legacy_pattern(target.name)
    host, now, removed = _host(), time.time(), []
    for p in folder.iterdir():
        if not p.name.startswith("."):
            continue
        m = owned.match(p.name)
        if m is not None:
            if m["host"] == host and not pid_alive(int(m["pid"])) and _remove(p):
                removed.append(p)
            continue
        if legacy.match(p.name):
            try:
                age = now - p.lstat().st_mtime
            except FileNotFoundError:
                continue
            if age >= legacy_age_s and _remove(p):
                removed.append(p)
    return removed


# ---- run-folder lock ----------------------------------------------------------------------------
class RunLock:
    """An exclusive lock on a run folder, held by this process while it writes the folder.

    The lock is the file ``.<folder name>.msff-lock`` beside the folder (it survives the folder
    being moved aside or replaced), locked with ``flock`` and holding the owner's pid, host and
    start time for messages. The kernel drops the ``flock`` when its process dies, even by
    SIGKILL, so a lock left by a dead process is stale by construction and is taken over.

    Example:
        >>> import tempfile, pathlib
        >>> run = pathlib.Path(tempfile.mkdtemp()) / "run"
        >>> with RunLock(run):
        ...     RunLock(run).holder() is not None
        True
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder.parent / f".{self.folder.name}.msff-lock"
        self._fd: Optional[int] = None
        self.took_over: Optional[dict] = None

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def holder(self) -> Optional[dict]:
        """The live holder's ``{pid, host, since}`` (``{}`` when unreadable), or None when free."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return self._read()
        finally:
            os.close(fd)
        return None

    def _message(self, info: dict) -> str:
        who = f"process {info.get('pid', '?')} on {info.get('host', '?')}"
        since = f" since {info['since']}" if info.get("since") else ""
        return (f"run folder {self.folder} is in use by {who}{since} (lock {self.path}); "
                "wait for it to finish or stop it first")

    def check(self) -> None:
        """Raise :class:`FolderLockedError` if a live process holds the lock (changes nothing)."""
        info = self.holder()
        if info is not None:
            raise FolderLockedError(self._message(info))

    def acquire(self) -> "RunLock":
        """Take the lock (creating the parent folder), or raise :class:`FolderLockedError`."""
        if self._fd is not None:
            return self
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, file_mode())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise FolderLockedError(self._message(self._read())) from None
            # The file may have been unlinked by its previous holder between our open and flock.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            old = self._read()
            if old:
                self.took_over = old
            info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
            self._fd = fd
            return self
        raise FolderLockedError(f"could not lock {self.folder}: its lock file {self.path} keeps changing")

    def release(self) -> None:
        """Drop the lock and remove its file."""
        if self._fd is None:
            return
        try:
            _unlink_quiet(self.path)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
