"""Look-up errors shared by the two registries (spectral bases, bases of adaptation)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["UnknownNameError", "unknown_name"]


class UnknownNameError(KeyError, ValueError):
    """A registry look-up of a name nothing answers to.

    It is both a ``KeyError`` (a failed look-up) and a ``ValueError`` (a bad
    argument), so either ``except`` clause catches it, and its message is
    printed as written (a plain ``KeyError`` would quote it).
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def unknown_name(kind: str, name: object, known: Iterable[str], extra: str = "") -> str:
    """Compose the message for an unknown ``name``, suggesting the closest known one.

    Args:
        kind: what is looked up ("basis", "base of adaptation").
        name: the name asked for.
        known: the registered names.
        extra: a sentence appended to the message.

    Returns:
        The message.
    """
    names = sorted(known)
    close = difflib.get_close_matches(str(name), names, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    tail = f" {extra}" if extra else ""
    return f"unknown {kind} {name!r}.{hint} Registered: {', '.join(names)}.{tail}"
