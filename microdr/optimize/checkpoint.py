"""Checkpoint files: a run's whole state in one file that is read whole or not at all.

Layout: the line ``microdr-checkpoint <format>``, the SHA-256 of the payload in hex and a
newline, then the payload: ``torch.save`` of a dict of tensors, numbers, strings, ``None`` and
lists, tuples and dicts of them. A file with another first line, another format, or a payload
whose hash differs (truncated or corrupted), or whose payload ``torch.load`` cannot read, is an
:class:`InputError`; the payload is read with ``torch.load(weights_only=True)``, which runs no
code from the file.

Files are written by :func:`microdr.io.files.write_files`: a temporary file, flushed to disk, then
renamed over the old checkpoint, so a killed run or a full disk leaves the old one whole.

A run's history grows by a row per iteration; rewritten whole into every checkpoint, that would
make the disk traffic of a run quadratic in its length. So the rows go to a :class:`Journal`
beside the checkpoint, a file that is only appended to, and the checkpoint keeps the length and
SHA-256 of the part of it that is its own (key ``"history_rows"``); :func:`read_checkpoint` puts
the rows back. A checkpoint without that key holds its rows itself, as earlier ones did.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from ..io.files import read_bytes

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
    """The state saved in checkpoint file ``path``, tensors on the CPU; its history's rows read
    back from its :class:`Journal` if it has one."""
    state = _read_payload(path)
    if isinstance(state, dict) and _JOURNAL in state:
        state = _with_journal_rows(Path(path), state)
    return state


def _read_payload(path: str | os.PathLike) -> Any:
    """The object saved in checkpoint file ``path``, as it is."""
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


#: The key under which a checkpoint refers to its part of the journal.
_JOURNAL = "history_rows"


class Journal:
    """The append-only file of a run's history rows beside its checkpoint ``checkpoint``:
    ``checkpoint.rows`` for ``checkpoint.pt``, one JSON object per line.

    rows: those already in the file (a resumed run's), which must be what it holds first.
    """

    def __init__(self, checkpoint: Path, rows: list[dict] = ()):
        self.path = checkpoint.with_suffix(".rows")
        self.count = len(rows)
        self.size = 0
        self.digest = hashlib.sha256()
        self._add(_lines(rows))

    def encode(self, state: dict[str, Any]) -> bytes:
        """The checkpoint file's bytes for ``state`` (a run's, with ``history["rows"]``): first
        the rows that the file does not have yet are appended to it and synced to disk, then the
        checkpoint refers to them instead of holding them."""
        rows = state["history"]["rows"]
        new = _lines(rows[self.count :])
        descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            # Cut back to this run's rows: a run killed after an append, or another run before.
            os.ftruncate(descriptor, self.size)
            os.lseek(descriptor, self.size, os.SEEK_SET)
            view = memoryview(new)
            while view:
                view = view[os.write(descriptor, view) :]
            os.fsync(descriptor)  # on disk before the checkpoint that counts on it
        except OSError as error:
            raise InputError(str(self.path), "", f"cannot write: {error.strerror}") from None
        finally:
            os.close(descriptor)
        self.count = len(rows)
        self._add(new)
        history = {key: value for key, value in state["history"].items() if key != "rows"}
        reference = {"bytes": self.size, "sha256": self.digest.hexdigest()}
        return encode_checkpoint({**state, "history": history, _JOURNAL: reference})

    def _add(self, data: bytes) -> None:
        self.size += len(data)
        self.digest.update(data)


def _lines(rows) -> bytes:
    """JSON lines: floats as ``repr`` writes them, so they read back bit for bit."""
    return b"".join(json.dumps(row).encode("utf-8") + b"\n" for row in rows)


def _with_journal_rows(path: Path, state: dict[str, Any]) -> dict[str, Any]:
    """``state`` read from checkpoint ``path`` with its history's rows back from its journal."""
    reference = state.pop(_JOURNAL)
    journal = Journal(path).path
    try:
        size, digest = reference["bytes"], reference["sha256"]
        history = dict(state["history"])
    except (TypeError, KeyError):
        raise InputError(str(path), "", "holds no state of a microdr optimize run") from None
    data = read_bytes(journal)[:size]
    if len(data) != size or hashlib.sha256(data).hexdigest() != digest:
        raise InputError(
            str(journal), "", f"does not match {path.name} (truncated or changed since)"
        )
    history["rows"] = [json.loads(line) for line in data.splitlines()]
    return {**state, "history": history}
