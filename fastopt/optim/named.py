"""Params held by name: a dict of arrays, or dicts of layers, or a list of layers.

NumPy training code often keeps a model as ``{"W1": ..., "b1": ...}``,
``{"layer1": {"W": ..., "b": ...}, ...}`` or ``[{"W": ..., "b": ...}, ...]``
(a list of layer dicts; lists inside dicts too, as JAX's pytrees) and its
backprop returns gradients in the same shape. The optimizer steps the
arrays in the tree's order (dicts' insertion order, lists' order); a
:class:`KeyTree` remembers that order so gradients are read back in it,
checked key by key. A list's key is its index: ``layers[1]['W']`` is
named ``1.W``.
"""

from __future__ import annotations

import numbers


def is_record(v) -> bool:
    """A namedtuple (``Layer(W=..., b=...)``, a JAX habit): a node whose
    arrays are named by its fields."""
    return isinstance(v, tuple) and type(v) is not tuple and hasattr(type(v), "_fields")


def is_tree(params) -> bool:
    """Whether ``params`` are given by name: a dict or a namedtuple, or a
    list or tuple holding a dict or a list (a list of layer dicts) and no
    param-group dict; a list of arrays is a plain list, by position."""
    if isinstance(params, dict) or is_record(params):
        return True
    return (type(params) in (list, tuple) and any(map(is_node, params))
            and not any(isinstance(p, dict) and "params" in p for p in params))


def is_node(v) -> bool:
    """A dict or list holding a param's place, not a value mistaken for an
    array: a dict of numbers alone is a param group without its 'params'
    (``[{"lr": 0.1}]``), a list of numbers alone an array's values (``[1.0,
    2.0]``), and a list with a string in it a (name, array) pair: each is
    refused as itself, not walked."""
    if isinstance(v, dict):
        return not all(isinstance(x, (numbers.Number, str)) for x in v.values())
    if is_record(v):
        return not all(isinstance(x, numbers.Number) for x in v)
    return type(v) in (list, tuple) and not any(isinstance(x, str) for x in v) and not all(
        isinstance(x, numbers.Number) for x in v)


class Seq(dict):
    """A list's (or tuple's) place in a KeyTree: its indexes as keys.
    ``part``: a :class:`ListPart`'s (its keys the indexes in the whole
    list), which may merge with the other parts of that list; ``size``:
    then the whole list's length, where group_params recorded it."""

    part = False
    size = None


class Fields(dict):
    """A namedtuple's place in a KeyTree: its fields as keys. Its gradients
    come as a namedtuple with those fields (read by name), a dict by them,
    or a plain tuple or list in the fields' order. ``fields``: all the
    namedtuple's fields in its order (a group's part holds some of them,
    and parts merge in the groups' order: a plain tuple is read by this)."""

    fields = None


class ListPart(dict):
    """A param group's part of a list of layers, made by ``group_params``:
    the layers (or their parts) by their indexes in the whole list, so the
    groups' parts merge into that list's shape and its gradients, a list
    like the params, are read by place. ``size``: the whole list's length
    (its gradients' length, whatever part of it this optimizer steps)."""

    size = None


class KeyTree:
    """The nested keys of a params dict (or list of layers), leaves in order.

    ``paths[i]`` is the key path of array ``i``; ``labels[i]`` its printable
    suffix (``['layer1']['W']``); ``names[i]`` its dotted name
    (``layer1.W``), what checkpoints record.
    """

    def __init__(self, tree: dict, paths=None):
        self.tree = tree            # key -> subtree dict (a Seq for a list), or None for an array
        # a list of layers (or a namedtuple): gradients in a list (or tuple) too
        self.seq_root = isinstance(tree, (Seq, Fields))
        walked = list(_leaf_paths(tree, ()))
        # param order: the tree's own, or (groups' trees merged, a layer's
        # arrays in two groups) each group's in turn
        self.paths = walked if paths is None else list(paths)
        at = {p: i for i, p in enumerate(walked)}
        # where the tree's walk meets the array at each place, when not in order
        self._walk_order = (None if self.paths == walked
                            else [at[p] for p in self.paths])
        self.labels = [_label(tree, p) for p in self.paths]
        self.names = [".".join(map(str, p)) for p in self.paths]
        self.flat = all(len(p) == 1 for p in self.paths)
        self._keys = [p[0] for p in self.paths] if self.flat else None

    @classmethod
    def of(cls, params: dict, where: str):
        """The tree of ``params`` and its arrays in order; an empty dict or
        list is refused, naming its key."""
        arrays = []
        return cls(_shape_of(params, where, arrays)), arrays

    def merge(self, other: "KeyTree", where: str) -> "KeyTree":
        """One tree over two param groups' dicts, in param order (a layer's
        arrays may sit in both, each array's key path in one only)."""
        return KeyTree(_merged(self.tree, other.tree, where, ()), self.paths + other.paths)

    def read(self, grads, name: str = "grads") -> list:
        """``grads`` (a dict or list shaped like the params) as a list in param order."""
        if self.flat and type(grads) is dict and len(grads) == len(self._keys):
            try:
                return list(map(grads.__getitem__, self._keys))
            except KeyError:
                pass                      # say which key, below
        out = []
        _read(grads, self.tree, name, out)
        if self._walk_order is not None:
            out = [out[i] for i in self._walk_order]
        return out


def _label(tree, path) -> str:
    """How errors name the array at ``path``: ``['l1']['W']``, a
    namedtuple's field as an attribute (``['l1'].W``), as the user's code
    reads it."""
    out, node = [], tree
    for k in path:
        out.append(f".{k}" if type(node) is Fields else f"[{k!r}]")
        node = node.get(k) if isinstance(node, dict) else None
    return "".join(out)


def _merged(a, b, where, prefix):
    """Trees ``a`` and ``b`` as one (new dicts): subtrees under one key merged,
    an array's key path in both refused."""
    if Seq in (type(a), type(b)) and not (getattr(a, "part", False)
                                          and getattr(b, "part", False)):
        label = "".join(f"[{x!r}]" for x in prefix)
        if type(a) is not type(b):
            raise ValueError(
                f"{where}: params{label} is a list in one param group and a dict in "
                "another: give every group's params the same way (fastopt.group_params "
                "makes such groups from one dict or list)")
        raise ValueError(
            f"{where}: params{label} is a list in two param groups: each group's list "
            "counts from 0, so gradients by place could not tell the groups' items "
            "apart; make the groups with fastopt.group_params(params, rule), which keeps "
            "each layer's place, or hold the layers in a dict by key")
    out = type(a)(a)
    if type(a) is Seq:
        out.part = True
        sizes = [x.size for x in (a, b) if getattr(x, "size", None) is not None]
        out.size = max(sizes) if sizes else None
    elif type(a) is Fields:
        out.fields = a.fields or b.fields
    for k, sub in b.items():
        if k not in out:
            out[k] = sub
        elif out[k] is None or sub is None:
            label = "".join(f"[{x!r}]" for x in prefix + (k,))
            raise ValueError(
                f"{where}: params{label} is a name in two param groups (gradients by "
                "name could not tell them apart): each array's key path must be in one "
                "group only; for groups of layers, keep each layer's key, e.g. "
                "[{'params': {'l1': model['l1']}}, {'params': {'l2': model['l2']}}]")
        else:
            out[k] = _merged(out[k], sub, where, prefix + (k,))
    return out


def _shape_of(d, where, arrays):
    if is_record(d):
        items, tree = zip(d._fields, d), Fields()
        tree.fields = d._fields
    elif type(d) is Fields:          # (group_params' part of a namedtuple)
        items, tree = d.items(), Fields()
        tree.fields = d.fields
    elif type(d) in (list, tuple):
        items, tree = enumerate(d), Seq()
    elif type(d) is ListPart:
        items, tree = d.items(), Seq()
        tree.part, tree.size = True, d.size
    elif isinstance(d, dict):
        items, tree = d.items(), {}
    else:
        raise TypeError(f"{where} must be a dict, got {type(d).__name__}")
    skipped = False
    for k, v in items:
        if _empty(v):
            # a place for layers to come (continual learning's {"heads": {}}):
            # no arrays, so no param's; taken for an array, it was refused as
            # "params['heads'] must be an ndarray, got dict"
            skipped = True
        elif is_node(v):
            tree[k] = _shape_of(v, f"{where}[{k!r}]", arrays)
        else:
            tree[k] = None
            arrays.append(v)
    if not tree:
        raise ValueError(f"{where} holds no arrays, only empty dicts or lists: nothing to "
                         "optimize" if skipped else
                         f"{where} is an empty {'list' if type(tree) is Seq else 'dict'}: "
                         "nothing to optimize")
    return tree


def _empty(v) -> bool:
    """An empty dict, list or tuple inside the params: a place for arrays to
    come, holding none."""
    return type(v) in (dict, list, tuple) and not v


def _leaf_paths(tree, prefix):
    for k, sub in tree.items():
        if sub is None:
            yield prefix + (k,)
        else:
            yield from _leaf_paths(sub, prefix + (k,))


def _read(g, tree, where, out):
    if type(tree) is Seq:
        # (group_params' parts: the indexes of the whole list, some maybe in
        # no group of this optimizer's)
        # (the whole list's length where group_params recorded it: a longer
        # list of gradients was taken, its extra items never read)
        loose = tree.part and tree.size is None
        n = tree.size or (max(tree) + 1 if tree.part else len(tree))
        if type(g) not in (list, tuple) or len(g) != n and not (loose and len(g) > n):
            raise TypeError(f"{where} must be a list of {n}"
                            + (" or more" if loose else "")
                            + ", as the params (each item shaped like its param's), got "
                            + (f"one of {len(g)}" if type(g) in (list, tuple)
                               else type(g).__name__))
    elif type(tree) is Fields and not isinstance(g, dict):
        fields = tree.fields or tuple(tree)
        if is_record(g) and set(g._fields) >= set(tree):
            g = g._asdict()                  # by field name, whatever its order
        elif type(g) in (list, tuple) and len(g) == len(fields):
            g = dict(zip(fields, g))         # by position, in the namedtuple's order
        else:
            raise TypeError(f"{where} must be a namedtuple with the params' fields ("
                            f"{', '.join(fields)}), a dict by them or a tuple of "
                            f"{len(fields)}, got " + (
                                f"one of {len(g)}" if type(g) in (list, tuple) else
                                f"{type(g).__name__} with fields {', '.join(g._fields)}"
                                if is_record(g) else type(g).__name__))
    elif not isinstance(g, dict):
        raise TypeError(f"{where} must be a dict with the params' keys, got "
                        f"{type(g).__name__}")
    if isinstance(g, dict) and type(tree) is not Seq:
        # keys beside the params' are other arrays' gradients (one optimizer per
        # layer handed the whole model's dict, frozen layers): not read, as a
        # torch optimizer never sees the grads of params it does not hold
        missing = [k for k in tree if k not in g]
        if missing:
            extra = [k for k in g if k not in tree]
            raise ValueError(f"{where} is missing {where}[{missing[0]!r}]; gradients must "
                             "have the params' keys" + (
                                 f" ({where}[{extra[0]!r}] is no param's: a misspelt key?)"
                                 if len(missing) == 1 and len(extra) == 1 else ""))
    for k, sub in tree.items():
        if sub is None:
            out.append(g[k])
        elif g[k] is None:          # a whole layer frozen: None for each of its arrays
            out.extend(None for _ in _leaf_paths(sub, ()))
        else:
            _read(g[k], sub, f"{where}[{k!r}]", out)
