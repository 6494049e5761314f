"""Param groups by a rule over the params' names: ``group_params``.

The recipe every fine-tune and every optax port writes by hand (no weight
decay on biases and norms, a smaller lr for the backbone) split a dict of
layers into group dicts by key path; written by hand, each group held new
dicts, so a layer's array replaced in the user's own dict went unseen
(the groups' dicts still held the old one, so the holder check of
fastopt/optim/orphans.py did not warn either: a trial's early stopping
that restored the best weights as ``layer["W"] = best.copy()`` trained
nothing after, without a word).
Here the groups remember the params they were made from (:class:`Groups`),
and the optimizer watches those as it watches params given whole.
"""

from __future__ import annotations

from .named import Fields, ListPart, _empty, is_node, is_record, is_tree

__all__ = ["group_params"]


def group_params(params, rule):
    """Param-group dicts for an optimizer from ``params`` by ``rule``.

    ``params``: a dict of name -> array (nested dicts of layers), a list
    of layer dicts (lists inside dicts too), a list of arrays, or (name,
    array) pairs (read as a dict). ``rule(name, array)`` returns the group
    options of that array (a dict such as ``{"weight_decay": 0.0}``; ``{}`` or None for the
    optimizer's defaults; ``False`` leaves the array out: buffers such as a
    batch norm's running statistics, kept beside the weights and never
    trained); ``name`` is the dotted key path (``"l1.W"``), or
    the index as a string in a list. Arrays whose options are equal share a
    group, the groups in the order their first array comes::

        groups = fastopt.group_params(
            params, lambda name, a: {"weight_decay": 0.0} if a.ndim == 1 else None)
        opt = fastopt.AdamW(groups, lr=1e-3, weight_decay=1e-2)
        opt.step(grads)       # grads: shaped like params, as without groups

    Groups of a dict hold the params by key path (the gradients still come
    as one dict like ``params``); a layer whose arrays all share a group is
    held as the user's own dict. A list of arrays or of layers (or a list
    inside the params) is split the same way, each group's part keeping the
    items' indexes, and the gradients come as one list like ``params``. The
    optimizer made from the groups watches ``params`` itself: an array
    replaced there (or an item appended to a list) is refused at the next
    step, naming it, as without groups. An array left out is no param: its
    gradient is not read (None, or no key for it), and it may be replaced
    (``bn["running_mean"] = ...`` each step).
    """
    options = []          # each group's options, in order
    if isinstance(params, (list, tuple)) and params and all(
            type(p) is tuple and len(p) == 2 and isinstance(p[0], str) for p in params):
        # named_parameters()' (name, array) pairs: by name, as the optimizer
        # takes them (the rule was handed each pair as its array)
        named = dict(params)
        if len(named) != len(params):
            raise ValueError("group_params: params holds (name, array) pairs with a name "
                             "that comes more than once: each array needs its own name")
        params = named
    if is_tree(params) or type(params) in (list, tuple):
        # (a plain list too: each group's part keeps the arrays' indexes,
        # so the gradients still come as one list in the params' order; as
        # new lists, a list split [w1, w2], [b1, b2] read the user's [gw1,
        # gb1, gw2, gb2] in the groups' order, each array stepped with
        # another's gradient where the shapes agreed)
        left_out = []
        trees = _split(params, (), rule, options, left_out)
        if not options:
            raise ValueError(f"group_params: the rule left out every array ({len(left_out)}): "
                             "nothing to train")
        return Groups([dict(opts, params=trees.get(k, {})) for k, opts in enumerate(options)],
                      params, left_out)
    raise TypeError("group_params takes a dict of name -> array (nested dicts of layers), "
                    f"a list of layer dicts or a list of arrays, got {type(params).__name__}")


class Groups(list):
    """group_params' param-group dicts, and the params they were made from
    (``source``): the optimizer watches that dict or list itself, so an
    array replaced in a layer whose arrays two groups share (whose groups
    hold new dicts) is seen, as a layer appended to a list."""

    def __init__(self, groups, source, left_out=()):
        super().__init__(groups)
        self.source = source
        #: the arrays of ``source`` the rule left out (buffers: no params)
        self.left_out = list(left_out)


def _group_of(rule, name, a, options) -> int:
    """The index of ``rule(name, a)``'s options among ``options`` (added
    there when new)."""
    opts = rule(name, a)
    if opts is None:
        opts = {}
    if opts is False:
        return None         # left out: not trained
    if not isinstance(opts, dict):
        raise TypeError(f"group_params: rule({name!r}, ...) must return a dict of group "
                        f"options, None (the defaults) or False (left out, not trained), got "
                        f"{type(opts).__name__}")
    if "params" in opts:
        raise ValueError(f"group_params: rule({name!r}, ...) returned 'params': it gives "
                         "a group's options only")
    for k, known in enumerate(options):
        if _same(known, opts):
            return k
    options.append(dict(opts))
    return len(options) - 1


def _same(a, b) -> bool:
    # (values compared one by one: a schedule or a tuple of betas)
    if a.keys() != b.keys():
        return False
    try:
        return all(bool(a[k] == b[k]) for k in a)
    except Exception:       # an array as a value: the optimizer's checks name it
        return all(a[k] is b[k] for k in a)


def _split(d, path, rule, options, left_out) -> dict:
    """``{group index: subtree of d}``: each group's part of ``d``, ``d``
    itself where all of it goes to one group (a list's parts: ListPart);
    the arrays the rule leaves out added to ``left_out``."""
    parts = {}
    items = list(d.items() if isinstance(d, dict) else d._asdict().items() if is_record(d)
                 else enumerate(d))
    for key, v in items:
        if _empty(v):
            continue            # a place for layers to come: no arrays (named._empty)
        if is_node(v):
            sub = _split(v, path + (key,), rule, options, left_out)
        else:
            k = _group_of(rule, ".".join(map(str, path + (key,))), v, options)
            if k is None:
                left_out.append(v)
                continue
            sub = {k: v}
        for k, part in sub.items():
            parts.setdefault(k, {})[key] = part
    if len(parts) == 1 and all(next(iter(parts.values())).get(key) is v for key, v in items):
        return {next(iter(parts)): d}    # the user's own dict: watched by the optimizer
    if is_record(d):       # a namedtuple's part: its fields by name, read as its own
        return {k: _part(Fields(part), fields=d._fields) for k, part in parts.items()}
    if not isinstance(d, dict):
        # a list's part keeps each item's index in the whole list (a new list
        # would count from 0): the parts merge back into the list's shape, so
        # its gradients still come as one list like the params
        return {k: _part(ListPart(part), size=len(d)) for k, part in parts.items()}
    return parts


def _part(part, **recorded):
    """``part`` with what it records of the whole it was split from."""
    for k, v in recorded.items():
        setattr(part, k, v)
    return part
