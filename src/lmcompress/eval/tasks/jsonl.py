"""Reading user-supplied JSON-lines task files with one clear error per problem."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ...errors import LMCompressError


def read_jsonl(path: str, required: dict[str, type | tuple[type, ...]], what: str,
               limit: int | None = None) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (blank lines skipped), each checked for the ``required`` fields and
    their types.

    Raises:
        LMCompressError: a missing or empty file, a line that is not a JSON object, or a missing/mistyped field
            (the message names the file, the line, the field and what is allowed).
    """
    if not path:
        raise LMCompressError(f"{what} needs path=FILE (a JSON-lines file); none was given")
    p = Path(path).expanduser()
    if not p.is_file():
        raise LMCompressError(f"{what} file {path!r} does not exist; allowed: the path of a JSON-lines file")
    records: list[dict[str, Any]] = []
    fields = ", ".join(required)
    with p.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise LMCompressError(f"line {number} of {path} is not JSON ({exc.msg}); allowed: one JSON object "
                                      f"per line") from None
            if not isinstance(rec, dict):
                raise LMCompressError(f"line {number} of {path} is not a JSON object; allowed: objects with {fields}")
            for name, kind in required.items():
                if name not in rec:
                    raise LMCompressError(f"line {number} of {path} lacks field {name!r}; allowed: {what} records "
                                          f"with {fields}")
                if not isinstance(rec[name], kind):
                    kinds = kind if isinstance(kind, tuple) else (kind,)
                    raise LMCompressError(
                        f"line {number} of {path}: field {name!r} is {type(rec[name]).__name__}; allowed: "
                        f"{' or '.join(k.__name__ for k in kinds)}")
            rec["_line"] = number
            records.append(rec)
            if limit is not None and len(records) >= limit:
                break
    if not records:
        raise LMCompressError(f"{what} file {path!r} is empty; allowed: a file with at least one record")
    return records


def pin_file(task, path: str, digest: str) -> None:
    """Fill a frozen task's ``sha256`` field with ``path``'s digest (so the result-store key changes with the
    file's content), or check a given one.

    Raises:
        LMCompressError: the file's content differs from the recorded ``digest``.
    """
    actual = hashlib.sha256(Path(path).expanduser().read_bytes()).hexdigest()[:16]
    if digest and digest != actual:
        raise LMCompressError(f"{path} changed since it was recorded (sha256 {actual}, recorded {digest}); allowed: "
                              f"the recorded file, or sha256='' to take the file as it is now")
    object.__setattr__(task, "sha256", actual)
