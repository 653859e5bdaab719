"""Checkpoint files: a run's whole state in one file that is read whole or not at all.

Layout: the line ``microdr-checkpoint <format>``, the SHA-256 of the payload in hex and a
newline, then the payload: ``torch.save`` of a dict of tensors, numbers, strings, ``None`` and
lists, tuples and dicts of them. A file with another first line, another format, or a payload
whose hash differs (truncated or corrupted), or whose payload ``torch.load`` cannot read, is an
:class:`InputError`; the payload is read with ``torch.load(weights_only=True)``, which runs no
code from the file.

Files are written by :func:`microdr.files.write_files`: a temporary file, flushed to disk, then
renamed over the old checkpoint, so a killed run or a full disk leaves the old one whole.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from typing import Any

import torch

from .errors import InputError
from .files import read_bytes

#: The layout and payload keys this version writes and reads; bumped when either changes.
FORMAT = 1
_MAGIC = b"microdr-checkpoint"


def encode_checkpoint(state: dict[str, Any]) -> bytes:
    """The file's bytes for ``state`` (tensors on any device are saved as they are)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    digest = hashlib.sha256(payload).hexdigest().encode("ascii")
    return _MAGIC + b" " + str(FORMAT).encode("ascii") + b"\n" + digest + b"\n" + payload


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The state saved in checkpoint file ``path``, tensors on the CPU."""
    source = str(path)
    data = read_bytes(path)
    header, _, rest = data.partition(b"\n")
    digest, _, payload = rest.partition(b"\n")
    magic, _, version = header.partition(b" ")
    if magic != _MAGIC:
        raise InputError(source, "", "not a microDR checkpoint")
    if version != str(FORMAT).encode("ascii"):
        shown = version.decode("ascii", "replace")
        raise InputError(
            source, "", f"checkpoint format {shown}, this microDR reads format {FORMAT}"
        )
    if hashlib.sha256(payload).hexdigest().encode("ascii") != digest:
        raise InputError(
            source, "", "corrupt checkpoint (truncated or changed: its checksum does not match)"
        )
    try:
        # torch warns about some pickles it then refuses: the refusal is the one line to show.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as error:  # whatever the bytes are, they are no checkpoint of ours
        raise InputError(
            source, "", f"not a readable checkpoint ({type(error).__name__} in its payload)"
        ) from None
