"""Parsing JSON that someone else may have written: head.json, bundle metadata, request bodies.

``json.loads`` recurses once per nesting level, so a document nested 100,000 deep raises
``RecursionError`` (not ``ValueError``), and a large one is read whole before any field is
checked.  :func:`loads` refuses both first, with the caller's one-line error: more than
``max_bytes`` of text, or more than ``MAX_DEPTH`` levels of ``[``/``{`` (counted by one
regular-expression scan that skips strings, before the parser runs).  ``NaN`` and
``Infinity``, which Python's parser accepts but JSON does not, are refused too.

torch- and numpy-free.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from embedx.errors import EmbedxError

#: Deepest nesting accepted: embedx's own documents are at most 5 levels deep.
MAX_DEPTH = 64
#: Largest document accepted by default (head.json, one metadata value).
MAX_BYTES = 8 * 1024 * 1024
#: The most classes, and the largest feature dimension, a head or bundle may declare.
MAX_SIZE = 1_000_000

_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)


def depth(data: bytes) -> int:
    """The deepest ``[``/``{`` nesting in JSON text (brackets inside strings do not count)."""
    level = deepest = 0
    for match in _TOKENS.finditer(data):
        char = match.group()[:1]
        if char in (b"[", b"{"):
            level += 1
            deepest = max(deepest, level)
        elif char in (b"]", b"}"):
            level -= 1
    return deepest


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def loads(text: str | bytes, *, what: str, error: type[EmbedxError] = EmbedxError, max_bytes: int = MAX_BYTES,
          max_depth: int = MAX_DEPTH, hint: str = "") -> Any:
    """``json.loads(text)`` within limits; ``error(f"{what} ...; {hint}")`` (one line) for text that
    is too large, too deeply nested, not valid JSON, or holds NaN/Infinity."""
    hint = f"; {hint}" if hint else ""
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
    if len(data) > max_bytes:
        raise error(f"{what} is {len(data):,} bytes, more than the {max_bytes:,} accepted{hint}")
    found = depth(data)
    if found > max_depth:
        raise error(f"{what} is nested {found} levels deep, more than the {max_depth} accepted{hint}")
    try:
        return json.loads(data, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        reason = " ".join(str(e).split())[:200]
        raise error(f"{what} is not valid JSON ({reason}){hint}") from e


def finite(value: Any) -> bool:
    """A number (not a bool) that ``float`` keeps finite (an integer of 400 digits overflows)."""
    if isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except (OverflowError, TypeError, ValueError):
        return False


def classes_problem(classes: Any) -> str | None:
    """Why ``classes`` is not a list of class names (None when it is one): a non-empty list of at
    most ``MAX_SIZE`` unique strings or finite numbers (1 and 1.0 are one class, "1" and 1 two)."""
    if not isinstance(classes, list) or not classes or not all(isinstance(c, (str, int, float)) for c in classes):
        return "a non-empty list of class names"
    if len(classes) > MAX_SIZE:
        return f"a list of at most {MAX_SIZE:,} class names"
    if not all(finite(c) for c in classes if isinstance(c, float)):
        return "a list of class names (no NaN or infinite numbers)"
    if len({(isinstance(c, str), c) for c in classes}) != len(classes):
        return "a list of unique class names"
    return None
