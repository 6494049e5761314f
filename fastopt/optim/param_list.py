"""A param group's ``"params"``: a list that notes being edited in place.

An optimizer steps the arrays it was given and holds state laid out for
them; an array replaced in ``param_groups[i]["params"]`` after that was
silently left out (the step went on updating the old one), where torch
would step the new one. The list notes any in-place edit (a cheap flag the
planned step reads), and the next step compares the arrays by identity and
refuses a replaced one, naming it.
"""

from __future__ import annotations


class ParamList(list):
    """A list of a group's params whose in-place edits set :attr:`edited`
    (cleared by a step that finds the same arrays again)."""

    __slots__ = ("edited",)

    def __init__(self, arrays=()):
        super().__init__(arrays)
        self.edited = False


def _noting(name):
    plain = getattr(list, name)

    def edit(self, *args, **kwargs):
        self.edited = True
        return plain(self, *args, **kwargs)
    edit.__name__ = edit.__qualname__ = name
    edit.__doc__ = plain.__doc__
    return edit


for _name in ("__setitem__", "__delitem__", "__iadd__", "__imul__", "append", "extend",
              "insert", "pop", "remove", "clear", "sort", "reverse"):
    setattr(ParamList, _name, _noting(_name))
