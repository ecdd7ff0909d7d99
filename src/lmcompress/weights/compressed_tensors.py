"""The compressed-tensors "pack-quantized" W4A16 layout (what llm-compressor writes, vLLM serves and transformers
loads through the ``compressed-tensors`` package), converted to and from this project's AutoAWQ GEMM tensors.

For a linear with ``N = out_features``, ``K = in_features`` and ``G = K // group_size``, a checkpoint stores:

* ``<linear>.weight_packed``: int32 ``[N, K // 8]``; word ``[n, c]`` holds the codes of input columns
  ``8c .. 8c+7`` of output row ``n``, column ``8c + i`` in bits ``4i .. 4i+3`` (no interleave), each code
  ``q + 8`` for the signed 4-bit value ``q`` in ``[-8, 7]``.
* ``<linear>.weight_scale``: ``[N, G]`` in the model's floating dtype.
* ``<linear>.weight_zero_point``: int32 ``[ceil(N / 8), G]``, only for asymmetric schemes: the signed zero points
  ``z`` in ``[-8, 7]`` packed the same way along the *output* dim (``z + 8`` in nibble ``n % 8`` of word
  ``[n // 8, g]``).
* ``<linear>.weight_shape``: int64 ``[2]`` = ``(N, K)``.
* weight ``W[n, k] = (q[n, k] - z[n, k // group_size]) * scale[n, k // group_size]`` (``z = 0`` if symmetric).

Our codes are unsigned (``code = q + 8``, ``zero = z + 8``), so the conversion is exact both ways for the codes
and zero points. Scales become float16 in our layout: exact from bfloat16 and float16 scales in float16's normal
range (bfloat16 has fewer mantissa bits), rounded once from float32 ones.

The config (``quantization_config`` in config.json) is the one the ``compressed-tensors`` package (0.20.1, what
llm-compressor 0.14 uses) writes for a ``W4A16`` / ``W4A16_ASYM`` group scheme; :func:`parse_ct_config` accepts
exactly the schemes this project can run and names any other.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import LMCompressError
from .config import SUPPORTED_GROUP_SIZES
from .packing import PACK, pack_columns, unpack_columns

QUANT_METHOD = "compressed-tensors"
PACK_FORMAT = "pack-quantized"
#: the compressed-tensors release whose writer this layout and config were checked against
CT_VERSION = "0.20.1"
SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")
_SHIFTS = tuple(4 * i for i in range(PACK))


def ct_quantization_config(group_size: int, zero_point: bool, ignore: list[str]) -> dict[str, Any]:
    """The ``quantization_config`` of a W4A16 pack-quantized checkpoint, as compressed-tensors writes it."""
    weights = {"dynamic": False, "group_size": group_size, "num_bits": 4, "strategy": "group",
               "symmetric": not zero_point, "type": "int"}  # fmt: skip
    group = {"format": PACK_FORMAT, "input_activations": None, "output_activations": None,
             "targets": ["Linear"], "weights": weights}  # fmt: skip
    return {
        "config_groups": {"group_0": group},
        "format": PACK_FORMAT,
        "global_compression_ratio": None,
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "moe_sparsity_config": None,
        "quant_method": QUANT_METHOD,
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": CT_VERSION,
    }


def _scheme_name(group: dict[str, Any]) -> str:
    """A short name for a config group's scheme, e.g. ``W8A16 int channel`` or ``W4A8 int group``."""
    w = group.get("weights") or {}
    a = group.get("input_activations")
    wbits = w.get("num_bits", "?")
    abits = a.get("num_bits", "?") if isinstance(a, dict) else 16
    text = f"W{wbits}A{abits} {w.get('type', '?')} {w.get('strategy', '?')}"
    if isinstance(a, dict):
        text += f" (activations quantized: {a.get('type', '?')} {abits}-bit)"
    return text


SUPPORTED_TEXT = (
    "supported: W4A16 (4-bit int weights, strategy 'group', group_size in "
    f"{', '.join(map(str, SUPPORTED_GROUP_SIZES))}, symmetric or asymmetric, no activation quantization) "
    f"in format '{PACK_FORMAT}'"
)


def parse_ct_config(qc: dict[str, Any], source: str) -> dict[str, Any]:
    """Validate a compressed-tensors ``quantization_config``; return ``{"bits", "group_size", "zero_point",
    "ignore"}``.

    Raises:
        LMCompressError: any scheme, format or option this project cannot run, named, with what is supported.
    """
    groups = qc.get("config_groups") or {}
    if not groups:
        raise LMCompressError(f"{source}: compressed-tensors config has no config_groups; {SUPPORTED_TEXT}")
    found: set[tuple[int, bool]] = set()
    for name, group in groups.items():
        w = group.get("weights")
        scheme = _scheme_name(group)
        fmt = group.get("format") or qc.get("format")
        problems = []
        if not isinstance(w, dict):
            problems.append("no weight quantization")
        else:
            if w.get("num_bits") != 4:
                problems.append(f"num_bits={w.get('num_bits')!r}")
            if w.get("type", "int") != "int":
                problems.append(f"type={w.get('type')!r}")
            if w.get("strategy") != "group":
                problems.append(f"strategy={w.get('strategy')!r}")
            elif w.get("group_size") not in SUPPORTED_GROUP_SIZES:
                problems.append(f"group_size={w.get('group_size')!r}")
            if w.get("dynamic") not in (None, False):
                problems.append(f"dynamic={w.get('dynamic')!r}")
            if w.get("actorder") not in (None, False):
                problems.append(f"actorder={w.get('actorder')!r} (g_idx)")
        if group.get("input_activations") is not None or group.get("output_activations") is not None:
            problems.append("activation quantization")
        if fmt != PACK_FORMAT:
            problems.append(f"format={fmt!r}")
        if "Linear" not in (group.get("targets") or []):
            problems.append(f"targets={group.get('targets')!r}")
        if problems:
            raise LMCompressError(
                f"{source}: compressed-tensors scheme {scheme} (config group {name!r}: {', '.join(problems)}) "
                f"is not supported; {SUPPORTED_TEXT}"
            )
        assert isinstance(w, dict)
        found.add((int(w["group_size"]), not w.get("symmetric", True)))
    if len(found) > 1:
        raise LMCompressError(
            f"{source}: config groups with different group sizes or symmetry {sorted(found)} are not supported; "
            "one W4A16 scheme for every quantized linear is"
        )
    if qc.get("kv_cache_scheme") is not None:
        raise LMCompressError(
            f"{source}: compressed-tensors kv_cache_scheme is not supported (lmcompress quantizes the KV cache "
            "itself: use a KV spec such as kivi2); remove it from the config"
        )
    if qc.get("transform_config"):
        raise LMCompressError(f"{source}: compressed-tensors transform_config (rotations) is not supported")
    group_size, zero_point = found.pop()
    return {"bits": 4, "group_size": group_size, "zero_point": zero_point, "ignore": list(qc.get("ignore") or [])}


def _pack_sequential(codes: torch.Tensor) -> torch.Tensor:
    """``[R, C]`` codes in ``[0, 16)`` (C a multiple of 8) -> ``[R, C // 8]`` int32, column ``8c + i`` in nibble i."""
    c = codes.to(torch.int64)
    shifts = torch.tensor(_SHIFTS, dtype=torch.int64, device=c.device)
    packed = (c.reshape(*c.shape[:-1], -1, PACK) << shifts).sum(dim=-1)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def _unpack_sequential(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of :func:`_pack_sequential`, cut to ``cols`` columns: ``[R, W]`` int32 -> ``[R, cols]`` uint8."""
    shifts = torch.tensor(_SHIFTS, dtype=torch.int32, device=packed.device)
    codes = (packed.unsqueeze(-1) >> shifts) & 0xF
    return codes.reshape(*packed.shape[:-1], -1)[..., :cols].to(torch.uint8)


def gemm_to_ct(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    *,
    zero_point: bool,
    scale_dtype: torch.dtype = torch.float16,
) -> dict[str, torch.Tensor]:
    """AutoAWQ GEMM tensors (``[K, N/8]``, ``[G, N/8]``, ``[G, N]``) -> the pack-quantized tensors of one linear.

    Args:
        zero_point: write ``weight_zero_point`` (asymmetric). ``False`` needs every zero point to be 8 (our
            symmetric codes), else the weights would change.

    Raises:
        LMCompressError: ``zero_point=False`` with zero points other than 8.
    """
    codes = unpack_columns(qweight).t()  # [N, K]
    zeros = unpack_columns(qzeros).t()  # [N, G]
    n, k = codes.shape
    out = {
        "weight_packed": _pack_sequential(codes.contiguous()),
        "weight_scale": scales.t().contiguous().to(scale_dtype),
        "weight_shape": torch.tensor([n, k], dtype=torch.int64),
    }
    if zero_point:
        rows = -(-n // PACK) * PACK
        padded = torch.full((rows, zeros.shape[1]), 8, dtype=torch.uint8, device=zeros.device)
        padded[:n] = zeros
        out["weight_zero_point"] = _pack_sequential(padded.t().contiguous()).t().contiguous()
    elif bool((zeros != 8).any()):
        raise LMCompressError(
            "a symmetric compressed-tensors checkpoint needs every zero point at 8 (quantized with "
            "zero_point=False); this model's are asymmetric: save it with zero points"
        )
    return out


def ct_to_gemm(
    tensors: dict[str, torch.Tensor], name: str, in_features: int, out_features: int, group_size: int,
    zero_point: bool,
) -> dict[str, torch.Tensor]:
    """The pack-quantized tensors of linear ``name`` -> AutoAWQ GEMM ``{qweight, qzeros, scales}``.

    Raises:
        LMCompressError: a tensor is missing or its shape or dtype disagrees with the config and the linear.
    """
    n, k, g = out_features, in_features, in_features // group_size
    expected = {"weight_packed": ((n, k // PACK), (torch.int32,)), "weight_shape": ((2,), None),
                "weight_scale": ((n, g), (torch.float16, torch.bfloat16, torch.float32))}  # fmt: skip
    if zero_point:
        expected["weight_zero_point"] = ((-(-n // PACK), g), (torch.int32,))
    for suffix, (shape, dtypes) in expected.items():
        key = f"{name}.{suffix}"
        if key not in tensors:
            raise LMCompressError(f"checkpoint lacks {key}, which its compressed-tensors config needs")
        t = tensors[key]
        if tuple(t.shape) != shape or (dtypes is not None and t.dtype not in dtypes):
            allowed = "/".join(str(d).removeprefix("torch.") for d in dtypes or ())
            raise LMCompressError(
                f"checkpoint tensor {key} has shape {tuple(t.shape)} {t.dtype}, but its config "
                f"(group_size={group_size}) and the model's {k}x{n} linear need {shape} {allowed}"
            )
    if [int(x) for x in tensors[f"{name}.weight_shape"]] != [n, k]:
        raise LMCompressError(
            f"checkpoint tensor {name}.weight_shape is {tensors[f'{name}.weight_shape'].tolist()}; "
            f"the model's linear is [{n}, {k}]"
        )
    codes = _unpack_sequential(tensors[f"{name}.weight_packed"], k)  # [N, K]
    if zero_point:
        zeros = _unpack_sequential(tensors[f"{name}.weight_zero_point"].t().contiguous(), n).t()  # [N, G]
    else:
        zeros = torch.full((n, g), 8, dtype=torch.uint8)
    return {
        "qweight": pack_columns(codes.t().contiguous()),
        "qzeros": pack_columns(zeros.t().contiguous()),
        "scales": tensors[f"{name}.weight_scale"].t().contiguous().to(torch.float16),
    }
