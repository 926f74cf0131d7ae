"""Name -> implementation tables, filled by decorators (a leaf: every layer may use it).

    SCORERS = {}
    register_scorer = registrar(SCORERS, "scorer")

    @register_scorer("self")
    class SelfScorer: ...

A name registered twice is an error (an extension silently replacing a built-in would change
what a flag means without a word).
"""

from __future__ import annotations

from typing import Callable, TypeVar

T = TypeVar("T")


def registrar(table: dict, kind: str) -> Callable[[str], Callable[[T], T]]:
    """``register(name)(obj)`` puts ``obj`` into ``table`` under ``name``; raises ValueError
    naming the ``kind`` when the name is taken."""

    def register(name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in table:
                raise ValueError(f"{kind} {name!r} is already registered ({table[name]!r})")
            table[name] = obj
            return obj

        return add

    return register
