"""The one error type users see.

Every problem with what the user gave (a scene, a mesh, an image, a flag) is raised as an
:class:`InputError`. The CLI prints ``str(error)`` as one line and exits with code 2; nothing
else reaches the user as a traceback unless ``--debug`` is given.
"""

from __future__ import annotations

import json
from typing import Any


class MicroDRError(Exception):
    """A failure the user can act on; its message is one line."""


class InputError(MicroDRError):
    """Bad input: names the file, the place in it, and what was expected.

    ``InputError("scene.json", "cameras[1].fov", 'expected a number in (0, 180), got "wide"')``
    reads ``scene.json: cameras[1].fov: expected a number in (0, 180), got "wide"``.
    ``where`` may be empty (the whole file) and ``source`` may be a flag name such as ``--lr``.
    """

    def __init__(self, source: str, where: str, message: str):
        self.source = str(source)
        self.where = where
        self.message = message
        parts = [p for p in (self.source, where, message) if p]
        super().__init__(": ".join(parts))


def show_value(value: Any, limit: int = 40) -> str:
    """A short JSON-like rendering of a user's value for error messages."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
