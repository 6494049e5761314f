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


def link_target(path):
    """``path``, or the file its symlink points to (where open() writes)."""
    return os.path.realpath(path) if os.path.islink(path) else path


def target_of(path):
    """Where a file written "to ``path``" goes: a symlink's target (as
    open() would write it; a rename would replace the link itself). A
    directory, a device or a pipe there is refused with the OSError naming
    ``path`` (a rename would replace it by a file: /dev/null, as root)."""
    target = link_target(path)
    if os.path.isdir(target):
        raise IsADirectoryError(21, "Is a directory", path)
    if os.path.lexists(target) and not os.path.isfile(target):
        raise FileExistsError(17, "exists and is not a regular file", path)
    return target


def write_atomically(path, data: bytes):
    """``data`` in ``path`` (:func:`target_of`), written beside it and
    renamed over it: an interrupted write leaves the old file or none,
    never half of one."""
    path = target_of(path)
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
