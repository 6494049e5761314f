"""The user's own list or dict of params, checked at each step.

An optimizer steps the arrays it was given, in place. A NumPy habit
rebinds instead: ``params["W"] = params["W"] - lr * g``, or
``params.update(np.load("weights.npz"))`` to reload weights. The entry then
holds a new array that the optimizer never sees: training of it stops
without a word, while the optimizer goes on updating the old array. So the
plain list or dict of arrays the params came in is checked before each
step, and an entry replaced or removed there is refused, naming it. Keys
added to a dict are allowed (then each step walks the dict by the
optimizer's keys: about 0.1 us a key): each of several per-layer
optimizers may be given the whole model's dict. An array appended to a
list is refused unless the optimizer has it (``add_param_group``): it
would never be trained. A dict nested deeper than a dict
of layers of arrays is watched up to :data:`DEEP_MAX` arrays.

The check is one list comparison in C: ``==`` between lists tries identity
first, so the same arrays compare equal without looking at their values
(measured 0.65 us a step for a list of 1,000 arrays, 4.6 us for a dict:
its values are listed first; a dict of layers is listed a layer at a
time). Another object in an array's place makes ``==`` compare values:
NumPy gives an array, whose truth value raises (anything that raises
means "changed"). Arrays of one element or none could compare equal by
value, so those are compared by identity.
"""

from __future__ import annotations

import itertools
import operator

from .grouping import Groups
from .named import KeyTree, ListPart, Seq, is_record, is_tree


#: a dict nested deeper than layers of arrays is walked in Python at each
#: step (about 0.15 us an array): watched up to this many arrays
DEEP_MAX = 128


class GivenParams:
    """The plain list or dict of arrays an optimizer was made from (:meth:`of`):
    :meth:`holds` before each step, :meth:`refuse` when it does not."""

    __slots__ = ("given", "shape", "n", "ref", "small", "pick", "where", "empty")

    def __init__(self, given, params, shape, where="params"):
        self.given = given
        # the key paths of the empty lists in it (layers to come): one
        # appended there is never trained, as one appended to a list of layers
        self.empty = tuple(_empty_lists(given)) if isinstance(given, dict) else ()
        self.where = where          # how errors name it: params, or a group's params
        self.shape = shape   # "list", "flat", "layers", "layer list" or "deep": how it is listed
        self.n = len(params)        # the optimizer's first n arrays (add_param_group adds more)
        self._remember(params)

    def _remember(self, values):
        """Compare the next steps' listing with ``values`` (a copy): the
        optimizer's arrays, or what the list or dict was last found to hold
        with them (keys added, views of them), so that a step compares
        objects by identity, not arrays by value."""
        self.ref = list(values)
        # where == could say "equal" for another array: by identity there
        self.small = tuple(i for i, a in enumerate(self.ref) if getattr(a, "size", 2) <= 1)
        self.pick = operator.itemgetter(*self.small) if len(self.small) > 1 else None

    @classmethod
    def of(cls, given, params, names, where="params"):
        """A watch over ``given`` when it is a list or dict (``names`` its
        KeyTree) of the very objects ``params`` (device arrays of other
        libraries are stepped through wrappers: not watched), a list of
        param-group dicts over such lists or dicts (:class:`GroupsWatch`),
        else None."""
        if type(given) is Groups:
            # group_params' groups: the user's own dict or list they were
            # made from, listed in its own order (the optimizer's is the
            # groups': a flat dict or a list split by the rule interleaves
            # them, and such a split went unwatched); _find still pairs the
            # optimizer's key paths with its params, as it is handed them
            source = given.source
            try:
                tree, leaves = (KeyTree.of(source, where) if is_tree(source)
                                else (None, source))
            except (TypeError, ValueError):
                return None
            # (with the arrays the rule left out: listed, never the optimizer's,
            # so one replaced there is no refusal: _find walks its params)
            if len(leaves) != len(params) + len(given.left_out) or {
                    id(a) for a in leaves} != {id(a) for a in (*params, *given.left_out)}:
                return None
            return cls.of(source, list(leaves), tree)
        if type(given) is list and given and all(
                type(g) is dict and "params" in g for g in given):
            return GroupsWatch.of(given, params)
        if is_record(given):
            return None             # a namedtuple holds its arrays for good
        if names is not None and (isinstance(given, dict) or names.seq_root):
            layers = all(sub is not None and type(sub) is dict
                         and all(v is None for v in sub.values())
                         for sub in names.tree.values())
            listed = type(given) in (list, tuple)
            shape = ("list" if names.flat and type(given) is list else
                     "flat" if names.flat and not listed else "deep" if not layers
                     else "layer list" if listed else "layers")
            if shape == "deep" and len(params) > DEEP_MAX:
                return None         # walked in Python each step: too slow to watch
        elif type(given) is list:
            shape = "list"
        else:
            return None
        try:
            leaves = _listed(given, shape)
        except (TypeError, AttributeError):
            leaves = None       # (an empty list beside the layers: walked, below)
        if (leaves is None or len(leaves) != len(params)) and shape != "deep" \
                and names is not None and len(params) <= DEEP_MAX:
            # empty dicts or lists beside the arrays (a place for layers to
            # come) are no arrays: the listing in C sees them, the walk not
            shape = "deep"
            leaves = _listed(given, shape)
        if leaves is None or len(leaves) != len(params) or any(
                a is not b for a, b in zip(leaves, params)):
            return None
        return cls(given, params, shape, where)

    def holds(self, params, names) -> bool:
        """Whether the list or dict still holds ``params`` (the optimizer's
        arrays, in order). The fixed cost of every step: kept to a few
        C-level operations while nothing changed."""
        ref = self.ref
        values = None
        try:
            values = _listed(self.given, self.shape)
            same = values == ref       # identity first: the same objects, no values read
        except Exception:        # a value's truth value: another object in an array's place
            same = False         # (or a layer's place holds no dict: not listed)
        if same:
            small = self.small
            if not small:
                return True
            if self.pick is None:
                if values[small[0]] is ref[small[0]]:
                    return True
            elif all(map(operator.is_, self.pick(values), self.pick(ref))):
                return True
        if self._find(params, names) is not None:
            return False
        if values is None:
            # an array added beside a dict's layers (d["extra"] = a): not
            # listed layer by layer any more (it raised here). Walked whole
            # from now on up to DEEP_MAX arrays; past that no longer
            # watched (a private list of the arrays, which always holds)
            if len(self.ref) <= DEEP_MAX:
                self.shape = "deep"
                values = _listed(self.given, self.shape)
            else:
                self.given, self.shape, values = list(self.ref), "list", self.ref
        self._remember(values)           # keys added, reordered, a view: fine, and now known
        return True

    def refuse(self, params, names):
        """Raise the ValueError naming the first entry that changed."""
        found = self._find(params, names)
        if found is not None:
            label, how = found
            listed = type(self.given) in (list, tuple, ListPart)
            _refuse(self.where + label, how, "list" if listed else "dict")

    def _find(self, params, names):
        """``(label, how)`` of the first entry that is not the optimizer's
        array any more (``how``: "removed" or "replaced"), or that was
        appended to a list and is not the optimizer's ("appended"); or None.
        ``params``: all the optimizer's arrays, the first ``n`` from
        ``given``."""
        given = self.given
        # by key path, a list too where group_params split it (the
        # optimizer's order is the groups'); else by place
        if self.shape != "list" or names is not None and names.flat and names.seq_root:
            for path, label, a in zip(names.paths, names.labels, params[:self.n]):
                d = given
                for k in path:
                    d = (d.get(k, _REMOVED) if isinstance(d, dict) else
                         getattr(d, k, _REMOVED) if is_record(d) and type(k) is str else
                         d[k] if type(d) in (list, tuple) and type(k) is int and k < len(d)
                         else _REMOVED)
                if d is not a and not _same_memory(d, a):
                    return label, "removed" if d is _REMOVED else "replaced"
            # a layer appended to a list of layers (or to a list inside a
            # dict): never trained (unless the optimizer has it: add_param_group)
            return (_appended(given, names.tree, "", params)
                    or _filled(given, self.empty, params))
        for i, a in enumerate(params[:self.n]):
            b = given[i] if i < len(given) else _REMOVED
            if b is not a and not _same_memory(b, a):
                return f"[{i}]", "removed" if b is _REMOVED else "replaced"
        if len(given) > self.n:        # (add_param_group's arrays may follow: fine)
            for i in range(self.n, len(given)):
                b = given[i]
                if not any(b is a or _same_memory(b, a) for a in params):
                    return f"[{i}]", "appended"
        return None


class GroupsWatch:
    """Param-group dicts whose ``"params"`` are plain lists or dicts
    (``[{"params": {"l1": model["l1"]}}, ...]``, how weight decay is put on
    weights only): each group's list or dict watched as :class:`GivenParams`
    watches a whole one. An array replaced in the user's model dict after
    the optimizer was made went on unnoticed there (the step updated the old
    one). Groups given another way (an array, a FlatArrays) are not watched."""

    __slots__ = ("parts",)

    def __init__(self, parts):
        self.parts = parts      # (GivenParams, first array, end, KeyTree or None) per group

    @classmethod
    def of(cls, given, params):
        parts, lo = [], 0
        for gi, spec in enumerate(given):
            arrays = spec["params"]
            where = f"groups[{gi}]['params']"      # (the list of groups given)
            tree = None
            try:
                if is_tree(arrays):       # a dict, a list of layers
                    tree, leaves = KeyTree.of(arrays, where)
                elif type(arrays) is list:
                    leaves = arrays
                else:
                    return None     # (an array or a FlatArrays: group sizes unknown here)
            except (TypeError, ValueError):
                return None
            hi = lo + len(leaves)
            watch = GivenParams.of(arrays, params[lo:hi], tree, where)
            if watch is not None:
                parts.append((watch, lo, hi, tree))
            lo = hi
        return cls(parts) if parts and lo == len(params) else None

    def holds(self, params, names) -> bool:
        for watch, lo, hi, tree in self.parts:
            # GivenParams.holds' first test inline: a step's fixed cost per group
            try:
                same = _listed(watch.given, watch.shape) == watch.ref
            except Exception:       # (see GivenParams.holds)
                same = False
            if (not same or watch.small) and not watch.holds(params[lo:hi], tree):
                return False
        return True

    def refuse(self, params, names):
        for watch, lo, hi, tree in self.parts:
            watch.refuse(params[lo:hi], tree)


def _appended(given, tree, label, params):
    """``(label, "appended layer")`` for the first item of a list in
    ``given`` past its place in ``tree`` (a KeyTree's, from a list) that is
    not one of the optimizer's ``params`` (an array of add_param_group's),
    else None."""
    if type(tree) is Seq and type(given) in (list, tuple):
        # past the list's length when group_params recorded it (its parts
        # may skip an index: an array the rule left out), else the tree's
        size = getattr(tree, "size", None)
        for i in range(len(tree) if size is None else size, len(given)):
            b = given[i]
            if not any(b is a or _same_memory(b, a) for a in params):
                return f"{label}[{i}]", "appended layer"
    for k, sub in tree.items():
        if sub is not None:
            try:
                inner = given[k]
            except (KeyError, IndexError, TypeError):
                continue             # (removed: _find names it first)
            found = _appended(inner, sub, f"{label}[{k!r}]", params)
            if found is not None:
                return found
    return None


def _empty_lists(d, path=()):
    """The key paths of the empty lists (and tuples) in the dict ``d``."""
    for k, v in d.items():
        if type(v) in (list, tuple) and not v:
            yield path + (k,)
        elif type(v) is dict:
            yield from _empty_lists(v, path + (k,))


def _filled(given, empty, params):
    """``(label, "appended layer")`` for the first item in one of the lists
    that were ``empty`` holding an array the optimizer does not step (one
    of its ``params``, an add_param_group's, or a view of all of one, it
    does), else None."""
    for path in empty:
        d = given
        for k in path:
            d = d.get(k) if isinstance(d, dict) else None
        if type(d) in (list, tuple):
            for i, item in enumerate(d):
                leaves = (_leaves(item) if isinstance(item, dict) or type(item) in (list, tuple)
                          else [item])
                # (arrays only: the optimizer's own, views of them included, are
                # fine; metadata such as names is no layer)
                if any(hasattr(v, "shape") and hasattr(v, "dtype") and not any(
                        v is a or _same_memory(v, a) for a in params) for v in leaves):
                    label = "".join(f"[{k!r}]" for k in path)
                    return f"{label}[{i}]", "appended layer"
    return None


def _same_memory(b, a):
    """``b`` a view of all of ``a``'s memory in its order (``a.reshape(...)``,
    ``a[:]``): what the optimizer writes, the user's entry shows."""
    return (type(b) is type(a) and getattr(b, "dtype", None) == getattr(a, "dtype", None)
            and getattr(b, "nbytes", -1) == getattr(a, "nbytes", -2)
            and b.flags.c_contiguous and a.flags.c_contiguous
            and b.__array_interface__["data"][0] == a.__array_interface__["data"][0])


def _listed(given, shape):
    """The list or dict's arrays in order, listed in C where its shape
    allows: a list as it is, a dict's values, a dict's or list's layers'
    values chained (raises when a layer is no longer a dict)."""
    if shape == "list":
        return given
    if shape == "flat":
        return list(given.values())
    if shape == "layers":
        return list(itertools.chain.from_iterable(map(dict.values, given.values())))
    if shape == "layer list":
        return list(itertools.chain.from_iterable(map(dict.values, given)))
    return _leaves(given)


def _leaves(d, out=None):
    """A dict's (or list's) arrays in order, nested dicts and lists walked."""
    out = [] if out is None else out
    for v in (d.values() if isinstance(d, dict) else d):
        if isinstance(v, dict) or type(v) in (list, tuple) or is_record(v):
            _leaves(v, out)
        else:
            out.append(v)
    return out


_REMOVED = object()


def _refuse(label, how, container):
    if how == "appended":
        raise ValueError(
            f"{label} was appended to the list this optimizer was made from, and the "
            "optimizer does not step it: add it with "
            f"opt.add_param_group({{'params': [{label}]}}) (its gradient then follows "
            "the others in step's list), or keep arrays that are not trained in a list of "
            "their own")
    if how == "appended layer":
        raise ValueError(
            f"{label} was added to a list in the params this optimizer was made from, "
            "and the optimizer does not step it: make the optimizer again over the whole "
            "list (or add it with opt.add_param_group), or keep arrays that another "
            "optimizer trains out of that list")
    if how == "removed":
        raise ValueError(
            f"{label} was removed from the {container} this optimizer was made from; "
            "the optimizer still steps that array: put it back, or make a new optimizer "
            "for the params you keep")
    raise ValueError(
        f"{label} was replaced in the {container} this optimizer was made from: the "
        "optimizer steps the arrays it was given, so the new array would not be trained. "
        "Put the optimizer's array back (it is in opt.param_groups) and copy new values "
        f"into it in place (old[...] = new; {_put_back(label)}), or make a new optimizer")


def _put_back(label, value="old") -> str:
    """``label = old``, or for a namedtuple's field (``params['l1'].W``, which
    cannot be assigned) the ``_replace`` that puts ``old`` back, a field of
    a field through both (``params['m'] = params['m']._replace(enc=...)``)."""
    head, dot, field = label.rpartition(".")
    if not dot or not field.isidentifier() or not head or "]" in field:
        return f"{label} = {value}"
    return _put_back(head, f"{head}._replace({field}={value})")
