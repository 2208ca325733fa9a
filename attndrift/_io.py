"""Files attndrift writes: the cache directory, cache folders and files shared by several
users, and atomic writes (a reader sees the old file or the new one, never a partial one)."""

import errno
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_dir() -> Path:
    """Where attndrift caches converted weights and statistics.

    ``$ATTNDRIFT_CACHE`` if set, else ``$XDG_CACHE_HOME/attndrift``, else
    ``~/.cache/attndrift``.
    """
    if env := os.environ.get("ATTNDRIFT_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "attndrift"


#: a shared cache: files readable by every user, folders readable and searchable
CACHE_FILE_MODE, CACHE_FOLDER_MODE = 0o644, 0o755
PERMISSION_HINT = (
    "Permission denied (a cache of another user? set ATTNDRIFT_CACHE to a folder of yours)"
)


def is_regular(path: Path) -> bool:
    """Whether ``path`` is a regular file (following links): a FIFO or a device in place of
    a cache file would block a reader, or never end."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def read_cache_bytes(path: Path) -> bytes:
    """The bytes of a cache file; a ValueError if it is not a regular file, a PermissionError
    that names the file."""
    if not is_regular(path):
        raise ValueError(f"{path} is not a regular file")
    try:
        return path.read_bytes()
    except PermissionError:
        raise PermissionError(errno.EACCES, PERMISSION_HINT, str(path)) from None


def cache_folder(path: Path) -> Path:
    """``mkdir -p path``, the folders it creates with mode 0755 (whatever the umask), so
    that a cache shared by several users stays readable; an error names the folder."""
    for folder in [*reversed(path.parents), path]:
        if folder.is_dir():
            continue
        try:
            folder.mkdir()
        except FileExistsError:
            if not folder.is_dir():
                raise NotADirectoryError(
                    errno.ENOTDIR, "is not a directory (it is in the cache's way)", str(folder)
                ) from None
            continue
        except PermissionError:
            raise PermissionError(errno.EACCES, PERMISSION_HINT, str(folder)) from None
        folder.chmod(CACHE_FOLDER_MODE)
    return path


def atomic_write(path: Path, write: Callable[[Path], object]) -> Path:
    """Write a cache file: ``write(tmp)`` fills a temporary file beside ``path`` (unique: pid
    and a random suffix), which is then fsynced and moved into place with ``os.replace``.

    Readers see the old file or the new one, never a partial one; concurrent writers (e.g.
    torchrun ranks filling the same cache) do not collide. The file gets mode 0644, new
    folders 0755; an error (permissions, a full disk) names ``path``. Returns ``path``.
    """
    cache_folder(path.parent)
    tmp = None
    try:
        fd, name = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp"
        )
        os.close(fd)
        tmp = Path(name)
        write(tmp)
        os.chmod(tmp, CACHE_FILE_MODE)  # mkstemp's 0o600 would hide a shared cache
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # the temporary file's name would say nothing to the user
        if e.filename is not None and not Path(str(e.filename)).name.startswith(f".{path.name}."):
            raise
        text = PERMISSION_HINT if isinstance(e, PermissionError) else e.strerror or str(e)
        raise type(e)(e.errno, text, str(path)) from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    return path
