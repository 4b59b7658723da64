"""Writing files so that no edit loses data: atomic, permission-keeping, serialised.

Every file precision_policy writes (edited op-info libraries, plan and graph JSON, converted
TensorFlow models) goes through this module:

- :func:`atomic_write` writes a temporary file beside the target, fsyncs it and renames it
  over the target, so a reader (or a crash) sees the old file or the new one, never half of
  one. The temporary file is named ``.<name>.<8 hex>.pp-tmp``: a process killed mid-write
  (``kill -9``, power loss) leaves it behind, and the next write of the same file removes it.
- :func:`locked_edit` serialises read-modify-write cycles of one file between processes with
  an advisory ``fcntl.flock`` on ``.<name>.lock`` beside it, and reads the file *under* the
  lock, so two concurrent edits of different ops cannot lose one another's change. The lock
  file is removed when the edit ends (a crashed holder's stale lock file is reused and then
  removed by the next edit).
- :func:`new_folder` builds a folder (a SavedModel) under a temporary name and renames it
  into place; leftovers of a crashed build are removed by the next build of the same folder.

What a write keeps of an existing target:

- **symlinks** are followed: the file the link points to is replaced and the link stays a
  link (a dangling link gets its target created), as ``echo > link`` does;
- **mode and owner** (uid, gid) are copied to the new file; when the owner cannot be kept
  (a non-root user writing someone else's group-writable file) a WARNING says so;
- **new files** get the mode the umask gives (``0o666 & ~umask``), as ``open()`` does;
- **hard links**: the file is still replaced atomically, so the *other* names of a hard-linked
  file keep the old content, and a WARNING says so. Writing in place would keep the link but
  lose atomicity: a crash in the middle of a 29 MB write would leave a truncated file under
  every name, which is exactly the loss this module exists to prevent. Hard-linked op-info
  files are rare; a broken link is visible and recoverable, a half-written library is not;
- a target that is not a regular file (``/dev/stdout``, a FIFO) is written in place, since
  replacing a device node by a regular file is never what the caller meant.

Example:
    >>> import os, pathlib, stat, tempfile
    >>> from precision_policy.fileio import atomic_write, locked_edit
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> f = d / "ops.json"
    >>> atomic_write(f, '{"Relu": {}}\\n')
    >>> f.chmod(0o640); (d / "link.json").symlink_to("ops.json")
    >>> atomic_write(d / "link.json", "{}\\n")          # through the link, into ops.json
    >>> (d / "link.json").is_symlink(), f.read_text(), oct(stat.S_IMODE(f.stat().st_mode))
    (True, '{}\\n', '0o640')
    >>> with locked_edit(f) as target:                   # read, change, write under the lock
    ...     target.write(target.read_text().replace("{}", '{"Add": {}}'))
    >>> f.read_text(), sorted(os.listdir(d))
    ('{"Add": {}}\\n', ['link.json', 'ops.json'])
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from precision_policy.errors import WriteError

try:  # POSIX; on other systems edits are not serialised between processes
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

#: Suffix of the temporary files and folders a write creates beside its target.
TEMP_SUFFIX = ".pp-tmp"
_NAME_MAX = 200  # the target's name is cut to this in temp and lock names (file names are at most 255 bytes)
#: ``tempfile.mkstemp``/``mkdtemp`` names the previous versions used (``.<name>.<8 chars>.tmp``): cleaned too.
_LEGACY = re.compile(r"\.[a-z0-9_]{8}\.tmp")
_OURS = re.compile(r"\.[0-9a-f]{8}" + re.escape(TEMP_SUFFIX))


def resolve(path: str | Path) -> Path:
    """The path a write of ``path`` lands on: every symlink followed (a dangling one to its target)."""
    return Path(os.path.realpath(os.fspath(path)))


def _stem(real: Path) -> str:
    return real.name[:_NAME_MAX]


def lock_path(path: str | Path) -> Path:
    """The advisory lock file of ``path``: ``.<name>.lock`` beside the file the path resolves to."""
    real = resolve(path)
    return real.with_name(f".{_stem(real)}.lock")


def _os_error(exc: OSError, path: str | Path, what: str = "cannot write") -> WriteError:
    text = exc.strerror or str(exc)
    parent = Path(path).parent if str(Path(path).parent) else Path(".")
    if isinstance(exc, FileNotFoundError) and not os.path.isdir(parent):
        text = f"folder {parent} does not exist"
    elif isinstance(exc, PermissionError):
        blocked = unreadable_folder(Path(path))
        if blocked is not None:
            text = f"folder {blocked} cannot be entered (no execute permission)"
        elif os.path.isdir(parent) and not os.access(parent, os.W_OK):
            text = f"folder {parent} is read-only to you (no write permission); write elsewhere or change its permissions"
    return WriteError(f"{what}: {text}; the previous file, if any, is unchanged", file=path)


@contextlib.contextmanager
def _flock(lock: Path, shown: str | Path) -> Iterator[bool]:
    """Hold an exclusive flock on ``lock`` (created if needed, removed on release); yields whether it is held.

    On a file system without flock (some network and FUSE mounts) it yields False after a WARNING:
    writes stay atomic, but concurrent edits are not serialised.
    """
    if fcntl is None:  # pragma: no cover
        yield False
        return
    fd = -1
    while fd < 0:
        try:  # read-only is enough for flock, and lets another user share a lock file the umask made 0644
            fd = os.open(lock, os.O_RDONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        except OSError as exc:
            raise _os_error(exc, shown) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise _os_error(exc, shown) from None
            with contextlib.suppress(OSError):
                os.unlink(lock)
            log.warning("%s: the file system does not support locks (%s); concurrent edits of this file may "
                        "overwrite each other", shown, exc.strerror or exc)
            yield False
            return
        except BaseException:
            os.close(fd)
            raise
        # the previous holder may have removed the lock file between our open and our lock:
        # then we hold a lock nobody else sees, and must take the lock file that exists now
        try:
            now: os.stat_result | None = os.stat(lock)
        except FileNotFoundError:
            now = None
        mine = os.fstat(fd)
        if now is None or (now.st_ino, now.st_dev) != (mine.st_ino, mine.st_dev):
            os.close(fd)
            fd = -1
    try:
        yield True
    finally:
        try:  # removed while held, so a waiter that opened it sees the inode change and retries
            os.unlink(lock)
        except OSError:
            pass
        os.close(fd)


def clean_leftovers(path: str | Path) -> list[Path]:
    """Remove the temporary files/folders that interrupted writes of ``path`` left beside it.

    Safe only while the path's lock is held (every writer here holds it), so that no live
    writer's temporary file is removed. Returns what was removed.
    """
    real = resolve(path)
    prefix = f".{_stem(real)}"
    removed: list[Path] = []
    try:
        entries = list(os.scandir(real.parent))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        rest = entry.name[len(prefix):]
        if not (_OURS.fullmatch(rest) or _LEGACY.fullmatch(rest)):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        except OSError as exc:
            log.warning("cannot remove %s, left by an interrupted write: %s", entry.path, exc.strerror or exc)
            continue
        log.info("removed %s, left by an interrupted write of %s", entry.path, real)
        removed.append(Path(entry.path))
    return removed


def _temp_name(real: Path) -> Path:
    return real.with_name(f".{_stem(real)}.{secrets.token_hex(4)}{TEMP_SUFFIX}")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _keep_owner_and_mode(fd: int, old: os.stat_result, real: Path) -> None:
    mine = os.fstat(fd)
    if (mine.st_uid, mine.st_gid) != (old.st_uid, old.st_gid) and hasattr(os, "fchown"):
        try:
            os.fchown(fd, old.st_uid, old.st_gid)
        except PermissionError:
            try:  # a user may still give the file its group
                os.fchown(fd, -1, old.st_gid)
            except PermissionError:
                pass
            log.warning("%s: owned by uid %d gid %d, but only its owner or root can give the rewritten file that "
                        "owner; it is now owned by uid %d", real, old.st_uid, old.st_gid, os.geteuid())
    if hasattr(os, "fchmod"):
        os.fchmod(fd, stat.S_IMODE(old.st_mode))  # after chown, which clears set-id bits


def _replace(real: Path, data: bytes, shown: str | Path) -> None:
    """Write ``data`` to ``real`` (symlinks already resolved); the caller holds the lock."""
    try:
        old: os.stat_result | None = os.stat(real)
    except FileNotFoundError:
        old = None
    except OSError as exc:
        raise _os_error(exc, shown) from None
    if old is not None and stat.S_ISDIR(old.st_mode):
        raise WriteError("is a folder; name a file to write", file=shown)
    if old is not None and not stat.S_ISREG(old.st_mode):  # a device or FIFO: write into it
        _write_in_place(real, data, shown)
        return
    if old is not None and old.st_nlink > 1:
        log.warning("%s has %d hard links: the new file replaces this name only, the other names keep the old "
                    "content (writing in place would keep them, but a crash would then truncate every name)",
                    shown, old.st_nlink)
    tmp = _temp_name(real)
    fd = -1
    try:
        # a new file gets the umask's mode (the kernel applies it); a replacement starts private
        # and gets the old file's mode and owner before anyone can see it under the real name
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                     0o666 if old is None else 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if old is not None:
            _keep_owner_and_mode(fd, old, real)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, real)
    except BaseException as exc:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise _os_error(exc, shown) from None
        raise
    _fsync_dir(real.parent)


def _write_in_place(path: str | Path, data: bytes, shown: str | Path) -> None:
    try:
        with open(path, "wb") as handle:
            handle.write(data)
    except OSError as exc:
        raise _os_error(exc, shown) from None


def _special(path: str | Path) -> bool:
    """True for an existing target that is neither a regular file nor a folder (``/dev/stdout``, a FIFO)."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


class LockedFile:
    """The target of :func:`locked_edit`: read it and write it while the lock is held."""

    def __init__(self, path: str | Path) -> None:
        self.shown = Path(path)  # as the caller named it (messages)
        self.path = resolve(path)  # the file really read and written

    def exists(self) -> bool:
        return self.path.exists()

    def read_bytes(self) -> bytes:
        return self.path.read_bytes()

    def read_text(self) -> str:
        """The text, UTF-8, line endings as they are."""
        return self.path.read_bytes().decode("utf-8")

    def write(self, data: str | bytes) -> None:
        """Atomically replace the file (text is written as UTF-8, line endings untouched)."""
        _replace(self.path, data.encode("utf-8") if isinstance(data, str) else bytes(data), self.shown)


@contextlib.contextmanager
def locked_edit(path: str | Path) -> Iterator[LockedFile]:
    """Hold ``path``'s edit lock for a read-modify-write cycle; read the file inside the block.

    Other processes editing the same file (through any symlink to it) wait; reading before
    the lock is taken would let one of two concurrent edits overwrite the other's. Temporary
    files that crashed writes of the file left behind are removed first, even when the edit
    then changes nothing.
    """
    target = LockedFile(path)
    with _flock(lock_path(target.path), target.shown) as held:
        if held:  # without the lock a live writer's temporary file could be taken for a leftover
            clean_leftovers(target.path)
        yield target


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Replace ``path`` with ``data`` atomically (text as UTF-8), keeping its mode, owner and symlinks.

    Raises :class:`~precision_policy.errors.WriteError` (the old file intact) when it cannot.
    """
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    if _special(path):  # /dev/stdout, a FIFO: nothing to replace or lock (its folder may be /proc or /dev)
        _write_in_place(path, raw, path)
        return
    with locked_edit(path) as target:
        target.write(raw)


@contextlib.contextmanager
def new_folder(path: str | Path) -> Iterator[Path]:
    """Build a new folder ``path`` under a temporary name; it appears, whole, when the block ends.

    ``path`` must not exist. On an error the temporary folder is removed; after a crash, the
    next ``new_folder`` of the same path removes it. The folder gets the umask's mode.
    """
    out = Path(path)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise WriteError(f"cannot write: folder {parent} does not exist", file=out)
    with _flock(lock_path(out), out) as held:
        if os.path.lexists(out):
            raise WriteError("already exists; choose a new folder (nothing was written)", file=out)
        real = resolve(out)
        if held:
            clean_leftovers(real)
        tmp = _temp_name(real)
        try:
            os.mkdir(tmp, 0o777)
        except OSError as exc:
            raise _os_error(exc, out) from None
        try:
            yield tmp
            try:
                os.rename(tmp, real)
            except OSError as exc:
                raise _os_error(exc, out) from None
            _fsync_dir(real.parent)
        finally:
            if os.path.lexists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------- reading inputs
#: The largest input file read without ``--max-input-bytes`` (protobuf parses at most 2 GiB anyway).
DEFAULT_MAX_INPUT_BYTES = 2 << 30
#: The limit in force: the CLI's ``--max-input-bytes`` sets it for the process; None means the default.
max_input_bytes: int | None = None

_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def unreadable_folder(path: Path) -> Path | None:
    """The first folder on the way to ``path`` this process may not enter (None if every one can be)."""
    p = path if path.is_absolute() else Path.cwd() / path
    for parent in reversed(p.parents):
        if parent.is_dir() and not os.access(parent, os.X_OK):
            return parent
    return None


def read_input(path: str | Path, error: Callable[..., Exception], *, limit: int | None = None) -> bytes:
    """The bytes of the input file ``path``, read safely; every problem is ``error(message, file=path)``.

    Only regular files are read: a FIFO would block forever and ``/dev/zero`` never ends, so
    both are refused *before* they are opened. A file over ``limit`` bytes (default
    :data:`max_input_bytes`, else :data:`DEFAULT_MAX_INPUT_BYTES`) is refused before it is read.
    A folder the process may not enter is named.

    Example:
        >>> from precision_policy.errors import GraphError
        >>> read_input("/dev/zero", GraphError)
        Traceback (most recent call last):
        ...
        precision_policy.errors.GraphError: /dev/zero: is a character device, not a regular file; ...
    """
    if "\x00" in str(path):
        raise error("invalid path: it contains a NUL byte", file=repr(str(path)))
    p = Path(path)
    limit = limit if limit is not None else (max_input_bytes if max_input_bytes is not None else DEFAULT_MAX_INPUT_BYTES)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise error("file not found", file=p) from None
    except PermissionError:
        folder = unreadable_folder(p)
        where = f"folder {folder} cannot be entered (no execute permission)" if folder else "permission denied"
        raise error(f"cannot read: {where}", file=p) from None
    except OSError as exc:  # ENOTDIR, ELOOP, ENAMETOOLONG...
        raise error(f"cannot read: {getattr(exc, 'strerror', None) or exc}", file=p) from None
    if stat.S_ISDIR(st.st_mode):
        raise error("expected a file, found a folder", file=p) from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"is {_kind(st.st_mode)}, not a regular file; inputs must be regular files "
                    "(copy the data to a file first)", file=p)
    if st.st_size > limit:
        raise error(f"is {st.st_size:,} bytes, over the {limit:,}-byte limit for inputs "
                    "(raise it with --max-input-bytes)", file=p)
    try:  # O_NONBLOCK: should the path have become a FIFO since the stat, opening it does not hang
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except PermissionError:
        raise error("cannot read: permission denied (no read permission on the file)", file=p) from None
    except OSError as exc:
        raise error(f"cannot read: {exc.strerror or exc}", file=p) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise error("is not a regular file (it changed while being opened)", file=p)
        chunks = []
        left = limit + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 24))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as exc:
        raise error(f"cannot read: {exc.strerror or exc}", file=p) from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > limit:
        raise error(f"grew past the {limit:,}-byte limit for inputs while being read (raise it with --max-input-bytes)",
                    file=p)
    return data


def read_input_text(path: str | Path, error: Callable[..., Exception], *, limit: int | None = None) -> str:
    """:func:`read_input` decoded as UTF-8 (a decoding error names the byte)."""
    data = read_input(path, error, limit=limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"not UTF-8 text ({exc.reason} at byte {exc.start})", file=Path(path)) from None


def refuse_output_over_input(src: Path, out: Path) -> None:
    """An output that is the input (the same path, or the same file through a link), or lies inside an
    input folder, would destroy the model it is made from: refused before anything is read."""
    if not os.path.lexists(src):
        return  # load_model says the input is missing
    same = False
    try:
        same = os.path.lexists(out) and os.path.samefile(src, out)
    except OSError:
        pass
    real_src, real_out = resolve(src), resolve(out)
    if same or real_src == real_out:
        raise WriteError(f"the output is the input ({src}); converting in place would destroy it: "
                         "name a new output file", file=out)
    if os.path.isdir(src) and real_src in real_out.parents:
        raise WriteError(f"the output lies inside the input SavedModel {src}: name an output outside it", file=out)
