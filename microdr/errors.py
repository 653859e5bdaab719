"""The one error type users see.

Every problem with what the user gave (a scene, a mesh, an image, a flag) is raised as an
:class:`InputError`. The CLI prints ``str(error)`` as one line and exits with code 2; nothing
else reaches the user as a traceback unless ``--debug`` is given.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any


class MicroDRError(Exception):
    """A failure the user can act on; its message is one line."""


class InputError(MicroDRError):
    """Bad input: names the file, the place in it, and what was expected.

    ``InputError("scene.json", "cameras[1].fov", 'expected a number in (0, 180), got "wide"')``
    reads ``scene.json: cameras[1].fov: expected a number in (0, 180), got "wide"``.
    ``where`` may be empty (the whole file) and ``source`` may be a flag name such as ``--lr``.
    The text is always one line: characters that are not printable (a newline in a JSON key or
    a file name, say) are written as escapes such as ``\\n``.
    """

    def __init__(self, source: str, where: str, message: str):
        self.source = str(source)
        self.where = where
        self.message = message
        parts = [p for p in (self.source, where, message) if p]
        super().__init__(one_line(": ".join(parts)))


def one_line(text: str) -> str:
    """``text`` with each character that is not printable (line breaks, control characters, lone
    surrogates) replaced by its Python escape, e.g. ``\\n``, ``\\x00``, ``\\ud800``."""
    if text.isprintable():
        return text
    # repr() of one character is its escape inside quotes; printable ones are kept as they are.
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def show_value(value: Any, limit: int = 40) -> str:
    """A short JSON-like rendering of a user's value for error messages, at most ``limit``
    characters (cut ones end in ``...``).

    Only the first ``limit`` characters are ever built, without recursion, so a huge or deeply
    nested value is as cheap and as safe to show as a small one.
    """
    text = ""
    for piece in _json_pieces(value):
        text += piece
        if len(text) > limit:
            return text[: limit - 3] + "..."
    return text


class _Text(str):
    """Literal JSON punctuation in :func:`_json_pieces`' work, as opposed to a value's string."""


def _json_pieces(value: Any) -> Iterator[str]:
    """The JSON text of ``value`` in pieces, lazily; values that JSON lacks appear as ``repr``.

    An explicit stack of iterators stands in for recursion, so nesting depth costs no frames.
    """
    stack: list[Iterator[Any]] = [iter([value])]
    while stack:
        item = next(stack[-1], _END)
        if item is _END:
            stack.pop()
        elif isinstance(item, _Text):
            yield item
        elif isinstance(item, dict):
            stack.append(_object_items(item))
        elif isinstance(item, (list, tuple)):
            stack.append(_array_items(item))
        else:
            yield _scalar(item)


_END = object()


def _array_items(items: list | tuple) -> Iterator[Any]:
    yield _Text("[")
    for index, item in enumerate(items):
        if index:
            yield _Text(", ")
        yield item
    yield _Text("]")


def _object_items(items: dict) -> Iterator[Any]:
    yield _Text("{")
    for index, (key, item) in enumerate(items.items()):
        yield _Text(f"{', ' if index else ''}{_scalar(key)}: ")
        yield item
    yield _Text("}")


def _scalar(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 1000:
        # str() refuses integers of more than 4300 digits; the size is what matters here.
        return f"<an integer of {value.bit_length()} bits>"
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)
