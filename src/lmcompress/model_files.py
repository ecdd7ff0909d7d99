"""Structural checks of model weight files (GGUF, safetensors) before anything loads them.

A truncated download or a file of garbage bytes otherwise fails deep inside the loaders with a traceback. These
checks read only the headers: the GGUF header, metadata and tensor table (every tensor's data must lie inside
the file), and the safetensors JSON header (every tensor's byte range must lie inside the file and match its
shape and dtype). They do not checksum tensor data: a file of the right length with flipped bytes passes.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import BinaryIO

from .errors import ModelFileError

GGUF_MAGIC = b"GGUF"
GGUF_DEFAULT_ALIGNMENT = 32
#: ggml tensor types -> (elements per block, bytes per block); types not listed are checked by offset only.
GGML_BLOCKS: dict[int, tuple[int, int]] = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 9: (32, 36),
    10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292),
    24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8), 30: (1, 2),
}
#: GGUF metadata value types with a fixed size (bytes).
_GGUF_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
#: safetensors dtypes -> bytes per element.
SAFETENSORS_DTYPES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8,
}


class _Truncated(Exception):
    pass


def _read(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise _Truncated
    return data


def _u32(f: BinaryIO) -> int:
    return struct.unpack("<I", _read(f, 4))[0]


def _u64(f: BinaryIO) -> int:
    return struct.unpack("<Q", _read(f, 8))[0]


def _skip(f: BinaryIO, n: int, size: int) -> None:
    if f.tell() + n > size:
        raise _Truncated
    f.seek(n, 1)


def _string(f: BinaryIO, size: int) -> bytes:
    n = _u64(f)
    if f.tell() + n > size:
        raise _Truncated
    return _read(f, n)


def _skip_value(f: BinaryIO, vtype: int, size: int, path: Path) -> None:
    if vtype in _GGUF_SCALARS:
        _skip(f, _GGUF_SCALARS[vtype], size)
    elif vtype == _GGUF_STRING:
        _skip(f, _u64(f), size)
    elif vtype == _GGUF_ARRAY:
        etype, count = _u32(f), _u64(f)
        if etype in _GGUF_SCALARS:
            _skip(f, _GGUF_SCALARS[etype] * count, size)
        else:
            for _ in range(count):
                _skip_value(f, etype, size, path)
    else:
        raise ModelFileError(f"GGUF file {str(path)!r} is corrupt: unknown metadata value type {vtype}")


_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                   12: "<d"}


def check_gguf(path: str | Path) -> dict[str, object]:
    """Check a GGUF file's header and that every tensor's data lies inside the file.

    Returns:
        the scalar and string metadata (arrays left out), e.g. ``{"llama.embedding_length": 576, ...}``.

    Raises:
        ModelFileError: not a GGUF file, truncated, or an inconsistent header (the message names the file).
    """
    path = Path(path)
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise ModelFileError(f"{str(path)!r} is not a GGUF file (no GGUF magic bytes); give a .gguf model")
            version, n_tensors, n_kv = _u32(f), _u64(f), _u64(f)
            if version not in (2, 3):
                raise ModelFileError(f"GGUF file {str(path)!r} has version {version}; supported: 2, 3")
            if n_tensors > size or n_kv > size:
                raise ModelFileError(f"GGUF file {str(path)!r} is truncated or corrupt: its header announces "
                                     f"{n_tensors} tensors and {n_kv} keys in {size} bytes")
            metadata: dict[str, object] = {}
            for _ in range(n_kv):
                key = _string(f, size).decode("utf-8", "replace")
                vtype = _u32(f)
                if vtype in _SCALAR_FORMATS:
                    metadata[key] = struct.unpack(_SCALAR_FORMATS[vtype], _read(f, _GGUF_SCALARS[vtype]))[0]
                elif vtype == _GGUF_STRING:
                    metadata[key] = _string(f, size).decode("utf-8", "replace")
                else:
                    _skip_value(f, vtype, size, path)
            alignment = metadata.get("general.alignment") or GGUF_DEFAULT_ALIGNMENT
            if not isinstance(alignment, int):
                raise ModelFileError(f"GGUF file {str(path)!r} is corrupt: general.alignment={alignment!r}")
            end = 0
            for _ in range(n_tensors):
                _string(f, size)
                n_dims = _u32(f)
                if n_dims > 8:
                    raise ModelFileError(f"GGUF file {str(path)!r} is corrupt: a tensor with {n_dims} dims")
                count = 1
                for _ in range(n_dims):
                    count *= _u64(f)
                ttype, offset = _u32(f), _u64(f)
                block, nbytes = GGML_BLOCKS.get(ttype, (1, 0))
                end = max(end, offset + -(-count // block) * nbytes)
            data_start = -(-f.tell() // alignment) * alignment
    except _Truncated:
        raise ModelFileError(f"GGUF file {str(path)!r} is truncated (its header ends early); re-download it") from None
    if data_start + end > size:
        raise ModelFileError(
            f"GGUF file {str(path)!r} is truncated: its tensors need {data_start + end} bytes, the file has {size}; "
            "re-download it"
        )
    return metadata


def check_safetensors(path: str | Path) -> None:
    """Check a safetensors file's header and that every tensor's bytes lie inside the file.

    Raises:
        ModelFileError: a header that is not valid safetensors JSON, or a truncated file.
    """
    path = Path(path)
    size = path.stat().st_size
    where = f"safetensors file {str(path)!r}"
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ModelFileError(f"{where} is truncated ({size} bytes, no header); re-download it")
        n = struct.unpack("<Q", raw)[0]
        if n > size - 8:
            raise ModelFileError(f"{where} is corrupt or truncated: header of {n} bytes in a {size}-byte file")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, ValueError):
            raise ModelFileError(f"{where} is corrupt: its header is not JSON") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{where} is corrupt: its header is not a JSON object")
    available = size - 8 - n
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in entry["data_offsets"])
            shape, dtype = [int(x) for x in entry["shape"]], entry["dtype"]
        except (KeyError, TypeError, ValueError):
            raise ModelFileError(f"{where} is corrupt: bad header entry for tensor {name!r}") from None
        if end > available:
            raise ModelFileError(
                f"{where} is truncated: tensor {name!r} ends at byte {end} of data, the file holds {available}; "
                "re-download it"
            )
        count = 1
        for dim in shape:
            count *= dim
        if dtype in SAFETENSORS_DTYPES and end - begin != count * SAFETENSORS_DTYPES[dtype]:
            raise ModelFileError(f"{where} is corrupt: tensor {name!r} {shape} {dtype} spans {end - begin} bytes")


def check_model_files(path: str | Path) -> None:
    """Check a ``.gguf`` file, or every ``*.safetensors`` file of a model folder (see the module docstring)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        check_gguf(path)
    elif path.is_dir():
        for file in sorted(path.glob("*.safetensors")):
            check_safetensors(file)
