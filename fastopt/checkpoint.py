"""Checkpoints: params, optimizer state and your own metadata in one ``.npz``.

::

    fastopt.save("ckpt.npz", params=params, optimizer=opt, extra={"epoch": 3})
    ...                                   # a fresh process: build params and opt as before
    ckpt = fastopt.load("ckpt.npz", params=params, optimizer=opt)
    ckpt["extra"]["epoch"]                # 3

The file is a plain NumPy ``.npz`` read with ``allow_pickle=False``: every
array is stored as itself (bfloat16 as its uint16 bits, since NumPy has no
name for it), and the structure around them (hyperparameters, schedule
specs, step counts, array dtypes) as JSON in a string array ``__meta__``.
Nothing in a checkpoint can run code when loaded.

Resuming is exact: N steps equal k steps, save, load (in a new process),
N - k steps, bit for bit, on every backend. Params and optimizer state on
the GPU (``backend="cuda"``) are copied to the host to save and back into
the same device arrays to load. :func:`load` checks the whole
checkpoint against ``params`` and ``optimizer`` before writing anything; on
any mismatch it raises :class:`CheckpointError` (a ValueError) and both are
left exactly as they were.

Saving is crash-safe: everything is checked (object arrays, unsupported
types, the target directory) before a byte is written; the file is written
to ``<path>.tmp-<pid>-<origin>-<random>`` next to ``path`` (``origin``:
this machine and PID namespace), flushed and fsynced,
renamed over ``path`` and the directory fsynced, so the previous checkpoint
stays readable until the new one is complete, even if the process is killed
(SIGKILL, power loss). A temporary file left by a killed save is removed by
the next save of the same ``path`` once its process is gone (one from
another machine or container sharing the folder: once an hour old).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import socket
import time
import zipfile
import zlib

import numpy as np

from ._files import link_target
from ._warn import give, held_warnings, warning_prefix
from .backends import is_device_array
from .optim.interrupt import finished
from .params import FlatArrays

__all__ = ["save", "load", "CheckpointError"]

FORMAT = "fastopt-checkpoint/1"
_META = "__meta__"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match what it is loaded into."""


class CheckpointTypeError(CheckpointError, TypeError):
    """A CheckpointError for a value of the wrong type: still a TypeError,
    which load_state_dict raised for it before it raised CheckpointError.
    (Named without an underscore: a traceback shows its name.)"""


def as_checkpoint_error(exc, prefix=""):
    """``exc`` (a TypeError or ValueError from the checks) as a CheckpointError."""
    cls = CheckpointTypeError if isinstance(exc, TypeError) else CheckpointError
    return cls(f"{prefix}{exc}")


def _extension_dtype(name):
    """NumPy dtypes stored by their bits (``kind == "V"``), found by name."""
    if name == "bfloat16":
        import ml_dtypes   # only when a checkpoint holds bfloat16
        return np.dtype(ml_dtypes.bfloat16)
    raise CheckpointError(f"the checkpoint holds an array of unknown dtype {name!r}")


def _encode(obj, arrays, path="root"):
    """Replace arrays by ``{"__array__": key, "dtype": name}`` references."""
    if isinstance(obj, np.ndarray):
        key = f"a{len(arrays)}"
        dtype = str(obj.dtype)
        if obj.dtype.hasobject:
            # np.savez would pickle it, and load (allow_pickle=False) could not
            # read it back: refuse before anything is written
            raise TypeError(f"cannot store an array of Python objects (dtype {obj.dtype}) "
                            f"in a checkpoint (at {path}); use a numeric or string dtype")
        # C order, its shape kept (np.ascontiguousarray makes a 0-d array 1-d:
        # a learnable scalar came back as shape (1,) and was refused)
        stored = np.require(obj, requirements="C")
        if obj.dtype.kind == "V":   # e.g. ml_dtypes.bfloat16: store the bits
            if obj.dtype.names is not None or obj.dtype.itemsize != 2:
                raise TypeError(f"cannot store dtype {obj.dtype} in a checkpoint (at {path})")
            stored = stored.view(np.uint16)
        arrays[key] = stored
        return {"__array__": key, "dtype": dtype}
    if isinstance(obj, dict):
        for k in obj:
            if not isinstance(k, str):
                raise TypeError(f"checkpoint keys must be strings, got {k!r} at {path}")
        if "__array__" in obj:
            raise ValueError(f"'__array__' is a reserved key (at {path})")
        return {k: _encode(v, arrays, f"{path}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode(v, arrays, f"{path}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint (at {path}); "
                    "use arrays, numbers, strings, lists and dicts")


def _decode(obj, arrays):
    if isinstance(obj, dict):
        if "__array__" in obj:
            a = arrays[obj["__array__"]]
            if str(a.dtype) != obj["dtype"]:
                a = a.view(_extension_dtype(obj["dtype"]))
            return a
        return {k: _decode(v, arrays) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, arrays) for v in obj]
    return obj


def _param_list(params):
    """Host params as ndarrays; device params (``__cuda_array_interface__``:
    numba, CuPy, torch CUDA) as numba device views, checked by the cuda
    backend."""
    from . import _validate as V
    from .params import PackedViews
    if isinstance(params, PackedViews):
        params = list(params)
    items = [params] if isinstance(params, np.ndarray) else params
    try:
        items = list(items)
    except TypeError:
        items = [items]
    if any(is_device_array(a) for a in items):
        from .backends import numba_cuda
        return [numba_cuda.as_device(f"params[{i}]", a) for i, a in enumerate(items)]
    if isinstance(params, FlatArrays):
        return list(params)
    return V.as_array_list("params", params)


def _is_group_list(params) -> bool:
    return (isinstance(params, (list, tuple)) and len(params) > 0
            and all(isinstance(g, dict) and "params" in g for g in params))


def _named_params(params):
    """``(KeyTree, arrays in its order)`` for params given by name (a dict,
    dicts of layers allowed, or a list of layers), ``(None, arrays)`` otherwise. A list of
    param-group dicts, as the optimizer took it, is its groups' arrays in
    order (the order of the optimizer's own params): by name where every
    group holds its params by name (a model's layers split between groups:
    loaded by position, layers of one shape were swapped without a word),
    else as a list."""
    from . import _validate as V
    params = V.listed(params)
    if _is_group_list(params):
        parts = [_named_params(g["params"]) for g in params]
        if all(names is not None for names, _ in parts):
            tree = parts[0][0]
            for gi, (names, _) in enumerate(parts[1:], 1):
                tree = tree.merge(names, f"params[{gi}]['params']")
            return tree, [a for _, arrays in parts for a in arrays]
        params = [a for _, arrays in parts for a in arrays]
    from .optim.named import KeyTree, is_tree
    if not is_tree(params):
        return None, _param_list(params)
    names, arrays = KeyTree.of(params, "params")
    for label, a in zip(names.labels, arrays):
        if not isinstance(a, np.ndarray) and not is_device_array(a):
            raise TypeError(f"params{label} must be an ndarray, got {type(a).__name__}")
    return names, _param_list(arrays)


def _stored_paths(names):
    """The key paths of params given by name as a checkpoint stores them:
    each key a string (an int or tuple key by ``str()``, as the optimizer's
    state_dict names them; the file's structure is JSON, whose keys are
    strings). Two keys that would be stored alike are refused."""
    paths = [tuple(k if isinstance(k, str) else str(k) for k in p) for p in names.paths]
    # a key stored like another (0 and "0"), or like a layer's key above
    # another array ({1: W, "1": {"x": b}}): one would hide the other
    seen = {}
    for path, label in zip(paths, names.labels):
        for k in range(1, len(path) + 1):
            other = seen.get(path[:k])
            if other is not None and (k == len(path) or other[1]):
                _same_name(other[0], label)
        for k in range(1, len(path)):
            other = seen.setdefault(path[:k], (label, False))
            if other[1]:
                _same_name(other[0], label)
        if path in seen:
            _same_name(seen[path][0], label)
        seen[path] = (label, True)
    return paths


def _same_name(first, second):
    raise ValueError(f"params{first} and params{second} have the same name in a checkpoint "
                     "(keys are stored as strings): rename one")


def _nest(paths, values):
    """The nested dict with ``values`` at the key ``paths``."""
    out = {}
    for path, v in zip(paths, values):
        d = out
        for k in path[:-1]:
            d = d.setdefault(k, {})
        d[path[-1]] = v
    return out


def _host_copy(a):
    """A copy on the host (a device array's copy is one already)."""
    return a.copy_to_host() if is_device_array(a) else np.array(a, copy=True)


def save(path, *, params=None, optimizer=None, extra=None) -> None:
    """Write ``params`` (arrays), ``optimizer.state_dict()`` and ``extra``
    (JSON-able data and arrays) to ``path`` as one ``.npz``.

    ``optimizer`` may be several: a list or a dict (by string keys) of
    optimizers (a GAN's two, one per layer), loaded back by :func:`load`
    given them the same way, all or nothing.

    Everything is checked before anything is written: an array of Python
    objects anywhere (``extra`` or state) raises TypeError naming where it
    is, a missing directory raises FileNotFoundError naming ``path``; the
    previous file under ``path`` is then untouched. The file is written next
    to ``path``, fsynced and renamed into place, so an interrupted save
    (even SIGKILL) never leaves a half-written checkpoint under ``path``;
    the next save removes the temporary file a killed one left behind.
    """
    tree = {"format": FORMAT}
    if params is None and optimizer is None and extra is None:
        # (it wrote a file that every load then refused as holding nothing)
        raise TypeError("save needs something to write: params=, optimizer= and/or extra= "
                        "(keywords), e.g. fastopt.save(path, params=params, optimizer=opt)")
    several = _several(optimizer)
    # A distributed optimizer (fastopt.distributed): its state_dict is a
    # collective, so a rank that failed a check before it tells the others,
    # who would wait there forever, and every rank raises
    agree_checked = getattr(optimizer, "_agree_save_checked", None)
    # Under the optimizers' locks, as their steps: params and state from one
    # step when a thread checkpoints while the training loop steps (the
    # params copied, as state_dict copies the state; written after)
    with _locked(optimizer, several):
        error = None
        try:
            if params is not None:
                # (params the optimizer updates none of are saved: a snapshot,
                # copies of the weights, is one; the load refuses such a pair)
                # device params: one copy to the host each (checkpoints are
                # host files); params given by name are kept by name
                names, arrays = _named_params(params)
                host = [_host_copy(a) for a in arrays]
                tree["params"] = host if names is None else _nest(_stored_paths(names), host)
            if extra is not None and agree_checked is not None:
                _encode(extra, {}, "root['extra']")    # its checks, before the collective
        except Exception as exc:    # noqa: BLE001 - raised below, or on every rank
            if agree_checked is None:
                raise
            error = exc
        if agree_checked is not None:
            agree_checked(error)
        if several is not None:
            states = [o.state_dict() for _, o in several]
            tree["optimizers"] = (dict(zip((k for k, _ in several), states))
                                  if isinstance(optimizer, dict) else states)
        elif optimizer is not None:
            tree["optimizer"] = optimizer.state_dict()
    if extra is not None:
        tree["extra"] = extra
    arrays = {}
    meta = _encode(tree, arrays)
    arrays[_META] = np.array(json.dumps(meta))
    path = os.path.expanduser(os.fspath(path))    # a ~ in it, as a shell would

    def write():
        # a symlink (latest.npz -> ckpt_100.npz): its target is written, as a
        # plain open() would; the rename would have replaced the link itself
        target = link_target(path)
        _check_target(target, path)
        _remove_stale_temps(target)
        try:
            _write_atomically(target, arrays)
        except OSError as exc:        # named by the user's path, not the hidden temporary
            # (a full disk while writing: an error naming no file at all)
            if exc.errno is None or exc.filename is not None and not str(
                    exc.filename).startswith(target + _TMP):
                raise
            raise OSError(exc.errno, f"cannot save checkpoint: {exc.strerror}", path) from None

    # A distributed optimizer (fastopt.distributed) has every rank gather the
    # state above and rank 0 alone write, and tells every rank how that went.
    coordinate = getattr(optimizer, "_coordinate_save", None)
    if coordinate is None:
        write()
    else:
        coordinate(write)


def _several(optimizer):
    """``[(key, optimizer), ...]`` where ``optimizer`` is a list, tuple or
    dict of them (a GAN's two, an actor's and a critic's; keys: positions
    or the dict's string keys), None for one optimizer or none. Anything
    else is refused, naming it."""
    if optimizer is None or callable(getattr(optimizer, "state_dict", None)):
        return None
    if isinstance(optimizer, dict):
        items = list(optimizer.items())
        for k, _ in items:
            if not isinstance(k, str):
                raise TypeError(f"a dict of optimizers is saved by its keys, which must be "
                                f"strings: got {k!r}")
        where = [f"optimizer[{k!r}]" for k, _ in items]
    elif type(optimizer) in (list, tuple):
        items = list(enumerate(optimizer))
        where = [f"optimizer[{i}]" for i, _ in items]
    else:
        raise TypeError(f"optimizer must be an optimizer (with a state_dict()), or a list "
                        f"or dict of them, got {type(optimizer).__name__}")
    if not items:
        raise ValueError("optimizer is an empty "
                         f"{type(optimizer).__name__}: give the optimizers to save, or none")
    for label, (_, o) in zip(where, items):
        if not callable(getattr(o, "state_dict", None)):
            raise TypeError(f"{label} must be an optimizer (with a state_dict()), got "
                            f"{type(o).__name__}")
        if getattr(o, "_coordinate_save", None) is not None:
            # (each one's save is a collective of its own: one file from
            # several would need them to agree in turn)
            raise TypeError(f"{label} is a distributed optimizer ({type(o).__name__}): save "
                            "it on its own, one file per optimizer")
    return items


def _locked(optimizer, several):
    """The optimizers' locks, taken in one order (by id: two threads saving
    the same optimizers in other orders cannot each hold one and wait)."""
    stack = contextlib.ExitStack()
    mine = [o for _, o in several] if several is not None else [optimizer]
    for o in sorted(mine, key=id):
        lock = getattr(o, "_lock", None)
        if lock is not None:
            stack.enter_context(lock)
    return stack


_TMP = ".tmp-"


def _check_target(path, given=None):
    """A clear error naming the user's path (``given``, where ``path`` is
    the target of its symlink), instead of the OS error about the hidden
    temporary file that the write would otherwise hit."""
    folder = os.path.dirname(os.path.abspath(path))
    label = path if given is None or given == path else f"{given} (-> {path})"
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise NotADirectoryError(f"cannot save checkpoint {label!r}: {folder!r} is not a "
                                 "directory")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot save checkpoint {label!r}: directory {folder!r} "
                                "does not exist")
    if os.path.isdir(path):
        raise IsADirectoryError(f"cannot save checkpoint {label!r}: it is a directory")
    if os.path.lexists(path) and not os.path.isfile(path):
        # a device (/dev/null) or a pipe: the rename would replace it by a file
        raise ValueError(f"cannot save checkpoint {label!r}: it exists and is not a regular "
                         "file (a device or a pipe); save to a file")


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # someone else's process: alive
        return True
    except OSError:           # cannot tell (e.g. no signal support): keep the file
        return True
    return True


#: a temporary file of a save on another machine (or in another PID
#: namespace: a container) is removed once it is this old, untouched: its
#: process id means nothing here, and a save in flight writes to it
FOREIGN_AGE_S = 3600.0

_origin = None


def _origin_tag() -> str:
    """8 hex digits naming this machine and PID namespace, in temporary
    files' names: a process id is only checked where it was given."""
    global _origin
    if _origin is None:
        parts = [socket.gethostname()]
        # (the first PID namespace has the same inode on many hosts: their
        # machine ids tell them apart where the host names do not)
        for read in (lambda: os.readlink("/proc/self/ns/pid"), _machine_id):
            try:
                parts.append(read())
            except OSError:
                parts.append("")
        _origin = hashlib.blake2s("\0".join(parts).encode(), digest_size=4).hexdigest()
    return _origin


def _machine_id() -> str:
    with open("/etc/machine-id") as f:
        return f.read().strip()


def _remove_stale_temps(path):
    """Remove ``<path>.tmp-<pid>-<origin>-...`` files whose process is gone
    (a save killed by SIGKILL cannot clean up after itself). Files of live
    processes (another save in flight) are left alone; so are other
    machines' and containers' (a shared folder: their process ids are not
    this one's to check; a save here deleted another machine's file while
    it was being written) until an hour untouched."""
    folder, name = os.path.split(os.path.abspath(path))
    prefix = name + _TMP
    try:
        entries = os.listdir(folder)
    except OSError:
        return
    for entry in entries:
        fields = entry[len(prefix):].split("-") if entry.startswith(prefix) else [""]
        pid = fields[0]
        if not pid.isdigit() or int(pid) <= 0:
            continue
        full = os.path.join(folder, entry)
        if len(fields) >= 3 and fields[1] != _origin_tag():     # (older names: no origin)
            try:
                if time.time() - os.stat(full).st_mtime < FOREIGN_AGE_S:
                    continue
            except OSError:
                continue
        elif _pid_alive(int(pid)):
            continue
        try:
            os.remove(full)
        except OSError:   # already gone, or not ours to remove: not worth failing a save
            pass


def _write_atomically(path, arrays):
    """Write, flush, fsync, rename, fsync the directory: after a crash
    ``path`` holds either the old checkpoint or the whole new one."""
    # pid (for stale-file cleanup) plus a random part, so that two threads
    # saving the same path never write into one temporary file
    tmp = f"{path}{_TMP}{os.getpid()}-{_origin_tag()}-{secrets.token_hex(4)}"
    # O_EXCL: never write into a file someone else created; 0o666 & umask:
    # the same permissions as the plain open() this replaced
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with open(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:   # also KeyboardInterrupt: no orphan left behind
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _fsync_dir(folder):
    """Make the rename itself durable (POSIX); not possible everywhere."""
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


_ZIP_MAGIC = b"PK\x03\x04"       # an .npz is a zip archive; so is every checkpoint


def _parsed(path, parse):
    """``parse(npz)`` on the checkpoint at ``path``, every way the file can
    fail to be one raised as :class:`CheckpointError` naming it; the
    contents' format checked."""
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise TypeError(f"a checkpoint's path is a str or os.PathLike, got {type(path).__name__}")
    path = os.path.expanduser(os.fspath(path))
    try:
        with open(path, "rb") as f:
            head = f.read(4)
        if head != _ZIP_MAGIC:
            # np.load read anything else as a pickle, and its refusal advised
            # allow_pickle=True: unpickling a file that is no checkpoint
            raise CheckpointError(f"{path} is not a fastopt checkpoint: " + (
                "the file is empty" if not head else
                f"not an .npz archive (it starts with {head!r})"))
        with np.load(path, allow_pickle=False) as npz:
            if _META not in npz.files:
                # weights saved with np.savez: "is it truncated?" misled
                raise CheckpointError(
                    f"{path} is an .npz archive but not a fastopt checkpoint (no {_META} "
                    f"entry; it holds {_listing(npz.files)}): fastopt.save writes checkpoints; "
                    "for arrays saved with np.savez, np.load the file and copy each one into "
                    "yours (w[...] = saved['w'])")
            tree = parse(npz)
    except (FileNotFoundError, CheckpointError):
        raise
    except (OSError, ValueError, EOFError, KeyError, TypeError, zipfile.BadZipFile,
            zlib.error, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not a readable fastopt checkpoint "
                              f"({type(exc).__name__}: {exc}): it is damaged or cut "
                              "short (a copy that did not finish, a failing disk); "
                              "resume from another copy") from None
    if not isinstance(tree, dict) or tree.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a fastopt checkpoint (format "
                              f"{tree.get('format') if isinstance(tree, dict) else None!r}, "
                              f"expected {FORMAT!r})")
    return tree


def _listing(names, most=6) -> str:
    shown = ", ".join(map(repr, names[:most]))
    return f"{shown}, ... ({len(names)} arrays)" if len(names) > most else shown or "nothing"


def _meta_of(npz) -> dict:
    return json.loads(str(npz[_META][()]))


def read(path) -> dict:
    """The checkpoint's contents, ``{"format", "params"?, "optimizer"? (or
    "optimizers"), "extra"?}``,
    without loading it into anything."""
    return _parsed(path, lambda npz: _decode(
        _meta_of(npz), {k: npz[k] for k in npz.files if k != _META}))


def read_meta(path) -> dict:
    """The checkpoint's contents as :func:`read` gives them, but with each
    array left as its JSON reference (``{"__array__": name, ...}``) and no
    array read: cheap, for a look at ``extra`` while time is short."""
    return _parsed(path, _meta_of)


def load(path, *, params=None, optimizer=None) -> dict:
    """Read a checkpoint and load it into ``params`` (copied in place) and
    ``optimizer`` (``load_state_dict``; a list or dict of optimizers, as
    they were saved); returns its contents.

    Both are checked in full before either is written: any mismatch raises
    :class:`CheckpointError` and changes nothing.
    """
    several = _several(optimizer)
    tree = read(path)
    # under the optimizers' locks, as their own load_state_dict: a step in
    # another thread sees the state before the load or after it. Their
    # warnings (an lr replaced) held until all of it is loaded: one made an
    # error (-W error) stopped a load of several optimizers halfway
    with _locked(optimizer, several), held_warnings() as held:
        try:
            apply = []
            if params is not None:
                apply.append(_prepare_params(params, tree))
                for _, o in several or ([(None, optimizer)] if optimizer is not None else []):
                    _refuse_other_arrays(params, o)
            if several is not None:
                for state, (label, o) in zip(_saved_states(path, tree, optimizer, several),
                                             several):
                    # (two optimizers' loads both warned about "param_groups[0]")
                    prefix = f"optimizer[{label!r}]: "
                    try:
                        with warning_prefix(prefix):
                            apply.append(_prefixed(prefix, o._prepare_load(state)))
                    except (TypeError, ValueError) as exc:
                        raise as_checkpoint_error(
                            exc, f"{path} does not match optimizer[{label!r}]: ") from None
            elif optimizer is not None:
                if "optimizer" not in tree:
                    raise CheckpointError(f"{path} holds no optimizer state" + (
                        f" of one optimizer: it holds {len(tree['optimizers'])} optimizers' "
                        "(give them as they were saved: a list or a dict)"
                        if "optimizers" in tree else ""))
                apply.append(optimizer._prepare_load(tree["optimizer"]))
        except CheckpointError:
            raise
        except (TypeError, ValueError) as exc:
            raise as_checkpoint_error(exc, f"{path} does not match: ") from None
        done = [0]

        def load_rest():
            while done[0] < len(apply):
                apply[done[0]]()        # idempotent: run again if interrupted in it
                done[0] += 1
        # a Ctrl-C while the arrays are copied: all of it loaded (from the
        # part it reached), then the interrupt goes on, as a step does
        finished(load_rest)
    give(held)
    return tree


def _prefixed(prefix, apply):
    """``apply`` (a prepared load), its warnings prefixed with ``prefix``."""
    def run():
        with warning_prefix(prefix):
            apply()
    return run


def _saved_states(path, tree, optimizer, several) -> list:
    """The saved state of each of ``several`` (the list or dict of
    optimizers given to load): by position from a list, by key from a dict."""
    saved = tree.get("optimizers")
    if saved is None:
        raise CheckpointError(f"{path} holds " + (
            "one optimizer's state, not several: load it with optimizer=<that optimizer>"
            if "optimizer" in tree else "no optimizer state"))
    if isinstance(optimizer, dict):
        if not isinstance(saved, dict):
            raise CheckpointError(f"{path} holds {len(saved)} optimizers as a list: give "
                                  "them as a list, in the order they were saved")
        if set(saved) != set(optimizer):
            raise CheckpointError(f"{path} holds the optimizers {sorted(saved)}, got "
                                  f"{sorted(optimizer)}")
        return [saved[k] for k, _ in several]
    if isinstance(saved, dict):
        raise CheckpointError(f"{path} holds optimizers by name ({sorted(saved)}): give them "
                              "as a dict by those names")
    if len(saved) != len(several):
        raise CheckpointError(f"{path} holds {len(saved)} optimizers' state, got "
                              f"{len(several)} optimizers")
    return saved


def _refuse_other_arrays(params, optimizer):
    """An optimizer made before the model was made again (a notebook cell
    run again) trains its old arrays: loaded beside the new params, the run
    went on training arrays nobody reads, the params never changing."""
    inner = getattr(optimizer, "base_optimizer", optimizer)     # SAM steps its base's
    mine = [_span(a) for a in getattr(inner, "_params", None) or ()
            if isinstance(a, np.ndarray) and a.size]
    if not mine:
        return   # device arrays, the distributed wrappers (a shard is its own buffer)
    given = [_span(a) for a in _named_params(params)[1] if isinstance(a, np.ndarray) and a.size]
    if not given or any(lo < g_hi and g_lo < hi for lo, hi in mine for g_lo, g_hi in given):
        return
    raise CheckpointError(
        f"the optimizer ({type(optimizer).__name__}) updates none of the params given: it "
        "was made over other arrays (the model made again after it?), and would go on "
        "training those; make the optimizer over these params, then load")


def _span(a):
    lo = a.__array_interface__["data"][0]
    return lo, lo + a.nbytes


def _prepare_params(given, tree):
    if "params" not in tree:
        raise CheckpointError("the checkpoint holds no params")
    from . import _validate as V
    from .optim.named import KeyTree, is_record
    names, params = _named_params(given)
    saved = tree["params"]
    if isinstance(saved, dict):         # saved by name: matched by name
        saved_names, saved_arrays = KeyTree.of(saved, "the checkpoint's params")
        if names is None:               # a list: the names' order when saved
            saved = saved_arrays
        else:
            by_path = dict(zip(saved_names.paths, saved_arrays))
            try:
                paths = _stored_paths(names)
            except ValueError as exc:
                raise CheckpointError(str(exc)) from None
            for path, label in zip(paths, names.labels):
                if path not in by_path:
                    raise CheckpointError(f"the checkpoint has no params{label}")
            given = set(paths)
            extra = [label for path, label in zip(saved_names.paths, saved_names.labels)
                     if path not in given]
            if extra:
                raise CheckpointError(f"the checkpoint has params{extra[0]}, which is not "
                                      "in the params given")
            saved = [by_path[p] for p in paths]
    elif names is not None and _is_group_list(V.listed(given)):
        names = None        # groups by name saved as a list (before they were by name)
    elif names is not None and is_record(given):
        names = None        # a namedtuple saved as a list (before its fields named it)
    elif names is not None:
        raise CheckpointError("the checkpoint holds its params as a list, not by name: "
                              "load them as a list, in the order they were saved")
    labels = ([f"params{label}" for label in names.labels] if names is not None
              else [f"params[{i}]" for i in range(len(params))])
    if len(saved) != len(params):
        raise CheckpointError(f"the checkpoint holds {len(saved)} params, got {len(params)}")
    for label, a, b in zip(labels, params, saved):
        if a.shape != b.shape or a.dtype != b.dtype:
            hint = ("; to start 16-bit params from full-precision weights, give them to "
                    "the optimizer: opt.sync_master(fastopt.load(path)['params'])"
                    if a.shape == b.shape and a.dtype.name in ("bfloat16", "float16")
                    and b.dtype.kind == "f" else "")
            raise CheckpointError(f"{label} is {a.dtype}{list(a.shape)} but the "
                                  f"checkpoint has {b.dtype}{list(b.shape)}{hint}")
        if not is_device_array(a) and not a.flags.writeable:
            raise CheckpointError(f"{label} is read-only")

    def apply():
        for a, b in zip(params, saved):
            if is_device_array(a):
                a.copy_to_device(np.ascontiguousarray(b))   # in place, where it lives
            else:
                a[...] = b
    return apply
