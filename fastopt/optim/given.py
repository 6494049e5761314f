"""The user's own list or dict of params, checked at each step.

An optimizer steps the arrays it was given, in place. A NumPy habit
rebinds instead: ``params["W"] = params["W"] - lr * g``, or
``params.update(np.load("weights.npz"))`` to reload weights. The entry then
holds a new array that the optimizer never sees: training of it stops
without a word, while the optimizer goes on updating the old array. So the
plain list or dict of arrays the params came in is checked before each
step, and an entry replaced or removed there is refused, naming it. Keys
added to a dict are ignored.

The check is one list comparison in C: ``==`` between lists tries identity
first, so the same arrays compare equal without looking at their values
(0.5 us for 1,000 arrays; a dict's values are listed first, 4.5 us). An
array of two or more elements in place of one makes NumPy's ``==`` give an
array, whose truth value raises: a mismatch. Arrays of one element or none
could compare equal by value, so those are compared by identity.
"""

from __future__ import annotations

import operator


class GivenParams:
    """The plain list or dict of arrays an optimizer was made from (:meth:`of`):
    :meth:`holds` before each step, :meth:`refuse` when it does not."""

    __slots__ = ("given", "small", "pick")

    def __init__(self, given, params):
        self.given = given
        # where == could say "equal" for another array: by identity there
        self.small = tuple(i for i, a in enumerate(params) if a.size <= 1)
        self.pick = operator.itemgetter(*self.small) if len(self.small) > 1 else None

    @classmethod
    def of(cls, given, params, names):
        """A watch over ``given`` when it is a plain list of the very arrays
        ``params`` or a dict of them (``names`` its KeyTree), else None."""
        if type(given) is dict and names is not None:
            return cls(given, params)
        if type(given) is list and len(given) == len(params) and all(
                a is b for a, b in zip(given, params)):
            return cls(given, params)
        return None

    def holds(self, params, names) -> bool:
        """Whether the list or dict still holds ``params`` (the optimizer's
        arrays, in order). The fixed cost of every step: kept to a few
        C-level operations."""
        given = self.given
        if type(given) is dict:
            if not names.flat:
                return self._find(params, names) is None
            values = list(given.values())
        else:
            values = given
        try:
            if values != params:
                return self._find(params, names) is None    # keys added, or reordered
        except (ValueError, TypeError):     # an array's truth value: another array
            return False
        small = self.small
        if not small:
            return True
        if self.pick is None:
            return values[small[0]] is params[small[0]]
        return all(map(operator.is_, self.pick(values), self.pick(params)))

    def refuse(self, params, names):
        """Raise the ValueError naming the first entry that changed."""
        found = self._find(params, names)
        if found is not None:
            label, removed = found
            _refuse(label, removed, "dict" if type(self.given) is dict else "list")

    def _find(self, params, names):
        """``(label, removed?)`` of the first entry that is not the
        optimizer's array any more, or None."""
        given = self.given
        if type(given) is dict:
            for path, label, a in zip(names.paths, names.labels, params):
                d = given
                for k in path:
                    d = d.get(k, _REMOVED) if type(d) is dict else _REMOVED
                if d is not a:
                    return label, d is _REMOVED
            return None
        for i, a in enumerate(params):
            b = given[i] if i < len(given) else _REMOVED
            if b is not a:
                return f"[{i}]", b is _REMOVED
        return None


_REMOVED = object()


def _refuse(label, removed, container):
    if removed:
        raise ValueError(
            f"params{label} was removed from the {container} this optimizer was made from; "
            "the optimizer still steps that array: put it back, or make a new optimizer "
            "for the params you keep")
    raise ValueError(
        f"params{label} was replaced in the {container} this optimizer was made from: the "
        "optimizer steps the arrays it was given (still the old one), so the new array "
        f"would not be trained. Copy new values into the old array in place "
        f"(params{label}[...] = new), or make a new optimizer")
