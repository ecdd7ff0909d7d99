"""Parse method strings into ``KVSpec`` (used by the CLI and grid configs).

Grammar: ``none`` or parts joined by ``+``; a part is ``name`` or ``name:key=value,key=value``. A name is a
registered eviction method (``snapkv``), a registered KV quantizer (``int``), or a quantizer name followed by
its bit width (``int4`` = ``int:bits=4``). Eviction parts take the sweep's ratio unless they set their own.
Wrappers (``adakv``, ``decoding``, ``threshold``) name their scorer with ``base=NAME`` and pass it arguments as
``base.KEY=VALUE``; the sweep's ratio then goes to the base.
Examples: ``snapkv``, ``streaming_llm:n_sink=8``, ``int4``, ``snapkv+int:bits=2,group_size=32``,
``adakv:base=snapkv``, ``decoding:base=knorm,interval=64,target_size=512``. The quantizer wrapper ``rotated``
takes its base the same way: ``rotated:base=kivi2,keys=false``, ``rotated:base=int,base.bits=2``.
"""

from __future__ import annotations

import re
from typing import Any

from ..errors import LMCompressError
from ..registry import EVICTION_METHODS, KV_QUANTIZERS
from .spec import KVSpec


def _value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _part(text: str) -> tuple[str, dict[str, Any]]:
    name, _, args = text.partition(":")
    kwargs: dict[str, Any] = {}
    for item in filter(None, args.split(",")):
        key, eq, val = item.partition("=")
        if not eq:
            raise LMCompressError(f"method argument {item!r} in {text!r} is not key=value")
        kwargs[key.strip()] = _value(val.strip())
    return name.strip().lower(), kwargs


def _build(cls, kwargs: dict[str, Any], text: str):
    try:
        return cls(**kwargs)
    except TypeError as exc:
        import dataclasses

        allowed = ", ".join(f.name for f in dataclasses.fields(cls))
        raise LMCompressError(f"bad arguments in {text!r} ({exc}); allowed: {allowed}") from None


def _quant_base(kwargs: dict[str, Any], raw: str) -> dict[str, Any]:
    """A quantizer wrapper's ``base=NAME`` (with ``base.KEY=VALUE`` arguments, ``base=int4`` shorthand) built."""
    base_name = kwargs.pop("base", None)
    base_kwargs = {k.removeprefix("base."): kwargs.pop(k) for k in list(kwargs) if k.startswith("base.")}
    if base_name is None:
        if base_kwargs:
            raise LMCompressError(f"{raw!r} passes base.* arguments but names no base=; allowed: base=NAME")
        return kwargs
    name = str(base_name).lower()
    match = re.fullmatch(r"([a-z_]+?)(\d+)", name)
    if name not in KV_QUANTIZERS and match and match.group(1) in KV_QUANTIZERS:
        name, base_kwargs = match.group(1), {"bits": int(match.group(2)), **base_kwargs}
    if name not in KV_QUANTIZERS:
        raise LMCompressError(
            f"base={base_name!r} in {raw!r} is not a KV quantizer; allowed: {', '.join(KV_QUANTIZERS.names())}"
        )
    return {**kwargs, "base": _build(KV_QUANTIZERS.get(name), base_kwargs, raw)}


def parse_method(text: str, ratio: float | None = None, budget: int | None = None) -> KVSpec:
    """``text`` -> ``KVSpec``; ``ratio``/``budget`` apply to the eviction part unless it sets its own."""
    text = text.strip()
    if text.lower() in ("none", "baseline", ""):
        return KVSpec()
    evict = quant = None
    parts = text.split("+")
    for i, raw in enumerate(parts):
        if not raw.strip():
            where = "after" if i else "before"
            raise LMCompressError(
                f"method {text!r}: the part {where} '+' is empty; allowed: NAME+NAME (e.g. snapkv+int4) or one NAME"
            )
    for raw in parts:
        name, kwargs = _part(raw)
        if name in EVICTION_METHODS:
            if evict is not None:
                raise LMCompressError(f"{text!r} names two eviction methods; allowed: at most one")
            base_name = kwargs.pop("base", None)
            base_kwargs = {k.removeprefix("base."): kwargs.pop(k) for k in list(kwargs) if k.startswith("base.")}
            target = kwargs
            if base_name is not None:
                if not isinstance(base_name, str) or base_name.lower() not in EVICTION_METHODS:
                    raise LMCompressError(
                        f"base={base_name!r} in {raw!r} is not an eviction method; "
                        f"allowed: {', '.join(EVICTION_METHODS.names())}"
                    )
                target = base_kwargs
            takes_ratio = getattr(EVICTION_METHODS.get(name), "takes_ratio", True)  # DMS: learned, no ratio
            if "ratio" not in target and "budget" not in target and (takes_ratio or base_name is not None):
                if budget is not None:
                    target["budget"] = budget
                elif ratio is not None:
                    target["ratio"] = ratio
            if base_name is not None:
                kwargs["base"] = _build(EVICTION_METHODS.get(base_name.lower()), base_kwargs, raw)
            evict = _build(EVICTION_METHODS.get(name), kwargs, raw)
            continue
        match = re.fullmatch(r"([a-z_]+?)(\d+)", name)
        if name not in KV_QUANTIZERS and match and match.group(1) in KV_QUANTIZERS:
            name, kwargs = match.group(1), {"bits": int(match.group(2)), **kwargs}
        if name in KV_QUANTIZERS:
            if quant is not None:
                raise LMCompressError(f"{text!r} names two KV quantizers; allowed: at most one")
            quant = _build(KV_QUANTIZERS.get(name), _quant_base(kwargs, raw), raw)
            continue
        raise LMCompressError(
            f"unknown method {name!r}; eviction: {', '.join(EVICTION_METHODS.names())}; "
            f"KV quantization: {', '.join(KV_QUANTIZERS.names())} (bit widths as e.g. int4); or none"
        )
    return KVSpec(evict=evict, quant=quant)


def split_methods(text: str) -> list[str]:
    """A comma-separated list of method strings -> the method strings. A piece of the form ``key=value`` (no
    ``:``) continues the previous method's arguments, so ``chunkkv:base=knorm,chunk_length=8,snapkv`` is two
    methods."""
    out: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        if out and "=" in piece and ":" not in piece.split("=", 1)[0]:
            out[-1] += "," + piece
        else:
            out.append(piece)
    return out


def has_eviction(text: str) -> bool:
    """Whether a method string contains an eviction part (so a ratio sweep applies)."""
    names = [_part(raw)[0] for raw in text.split("+") if raw.strip()]
    return any(n in EVICTION_METHODS and getattr(EVICTION_METHODS.get(n), "takes_ratio", True) for n in names)
