"""Files written whole or not at all."""

from __future__ import annotations

import contextlib
import os
import secrets


def sibling_temp(path, suffix=""):
    """A new name beside ``path`` for a file to be renamed over it (not
    created here: whoever writes it creates it, with the usual permissions)."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.{secrets.token_hex(6)}.tmp{suffix}")


def write_atomically(path, data: bytes):
    """``data`` in ``path``, written beside it and renamed over it: an
    interrupted write leaves the old file or none, never half of one. A
    symlink's target is written (as open() would); a device or a pipe
    there is refused (the rename would replace it)."""
    if os.path.islink(path):
        path = os.path.realpath(path)
    if os.path.lexists(path) and not os.path.isfile(path):
        raise IsADirectoryError(21, "Is a directory", path) if os.path.isdir(path) else \
            FileExistsError(17, "exists and is not a regular file", path)
    tmp = sibling_temp(path)
    try:
        # 0o666 less the umask, as open() makes files (mkstemp's are 0o600)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
