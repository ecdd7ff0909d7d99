"""Save and load 4-bit checkpoints in the AutoAWQ GEMM format or the compressed-tensors pack-quantized format.

A saved folder holds ``config.json`` (the model config with ``quantization_config = {"quant_method": "awq",
"bits": 4, "group_size": g, "zero_point": ..., "version": "gemm", "modules_to_not_convert": null}``, as
AutoAWQ writes it and vLLM reads it), ``model.safetensors`` (``<linear>.qweight/.qzeros/.scales`` for every
quantized linear, ordinary tensors for the rest), the generation config, if given the tokenizer, and
``lmcompress_checkpoint.json`` (the marker that lets ``overwrite`` replace this folder and nothing else).

Writing goes to a hidden temporary folder next to the target, renamed into place only when complete, so a
failed save leaves no half-written output. transformers loads such folders only through the ``autoawq``
package; :func:`load_quantized` is this project's own loader.

``format="compressed-tensors"`` writes the same weights as llm-compressor's W4A16 "pack-quantized" output
instead (see :mod:`.compressed_tensors`): transformers loads it with the ``compressed-tensors`` package installed,
vLLM serves it. :func:`load_quantized` reads both, also when another tool wrote them; a linear stored as a plain
``.weight`` (an ignored / ``modules_to_not_convert`` module) stays an ``nn.Linear``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._compat import decoder_layers, detached_hf_quantizer
from ..errors import LMCompressError, ModelFileError
from ..model_files import check_safetensors
from . import compressed_tensors as ct
from .config import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES, RTNConfig
from .linear import WQLinear
from .mappings import mapping_for
from .packing import PACK

#: written into every checkpoint folder this project saves; only folders holding it may be overwritten.
CHECKPOINT_MARKER = "lmcompress_checkpoint.json"
#: provenance file of ``lmcompress awq quantize`` (older checkpoints have it but no marker).
LEGACY_MARKERS = ("lmcompress_quantization.json",)


def is_lmcompress_checkpoint(folder: str | Path) -> bool:
    """Whether ``folder`` is a checkpoint folder lmcompress wrote (it holds the marker file, or the provenance
    file of an older ``awq quantize``)."""
    folder = Path(folder)
    return folder.is_dir() and any((folder / name).is_file() for name in (CHECKPOINT_MARKER, *LEGACY_MARKERS))


def check_output_dir(path: str | Path, *, overwrite: bool = False) -> Path:
    """Check that ``path`` may receive a checkpoint; returns it resolved.

    Allowed: a path that does not exist, an empty folder, or with ``overwrite`` a folder lmcompress wrote
    (:func:`is_lmcompress_checkpoint`). Nothing is deleted here.

    Raises:
        LMCompressError: ``path`` is a file, or a non-empty folder without ``overwrite``, or (with ``overwrite``)
            a non-empty folder lmcompress did not write.
    """
    target = Path(path).expanduser().resolve()
    if target.exists() and not target.is_dir():
        raise LMCompressError(f"output {str(target)!r} is a file, not a folder; allowed: a new or empty folder")
    if target.is_dir() and any(target.iterdir()):
        if not overwrite:
            raise LMCompressError(
                f"output {str(target)!r} exists and is not empty; choose a new path or overwrite"
            )
        if not is_lmcompress_checkpoint(target):
            raise LMCompressError(
                f"output {str(target)!r} is not a checkpoint lmcompress wrote (no {CHECKPOINT_MARKER}); "
                "overwrite only replaces those: choose a new or empty folder"
            )
    return target


def _ordinary_permissions(folder: Path) -> None:
    """Files 0666 and folders 0777, less the umask (temporary files are created private)."""
    umask = os.umask(0)
    os.umask(umask)
    for root, _dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


#: ``save_quantized(format=...)`` values
FORMATS = ("awq", "compressed-tensors")


@contextmanager
def atomic_output_dir(path: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``path`` when the block succeeds and vanishes when it fails.

    The finished folder and its files get ordinary permissions (0777 / 0666 less the umask). An existing
    ``path`` is checked by :func:`check_output_dir` (with ``overwrite``, only a folder lmcompress wrote is
    replaced).

    Raises:
        LMCompressError: see :func:`check_output_dir`.
    """
    target = check_output_dir(path, overwrite=overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        _ordinary_permissions(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def quantization_config_of(model: nn.Module) -> dict[str, Any]:
    """The model's ``quantization_config`` (set by ``quantize_``), validated."""
    qc = getattr(model.config, "quantization_config", None)
    if qc is None:
        raise LMCompressError("model has no quantization_config: run quantize_(model, ...) before saving it")
    return qc if isinstance(qc, dict) else qc.to_dict()


def save_quantized(
    model: nn.Module,
    path: str | Path,
    *,
    tokenizer: Any = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
    format: str = "awq",
) -> Path:
    """Write a quantized model as an AWQ GEMM or compressed-tensors checkpoint folder (atomically).

    Args:
        model: a model after ``quantize_``.
        path: the folder to create.
        tokenizer: saved alongside if given.
        dtype: store the non-quantized floating tensors (embeddings, norms, lm_head, biases) in this dtype
            (AutoAWQ and vLLM expect float16); ``None`` keeps the model's. Scales stay float16 either way.
        overwrite: replace an existing non-empty folder, if lmcompress wrote it (it holds
            :data:`CHECKPOINT_MARKER`, which every saved folder gets).
        extra_files: more text files to write into the folder (name -> content).
        format: ``"awq"`` (AutoAWQ GEMM: ``qweight/qzeros/scales``) or ``"compressed-tensors"`` (W4A16
            pack-quantized: ``weight_packed/weight_scale/weight_zero_point/weight_shape``; scales float16, or
            float32 with ``dtype=float32`` / a float32 model kept as is).

    Returns:
        the folder's path.
    """
    if format not in FORMATS:
        raise LMCompressError(f"format={format!r} is not supported; allowed: {', '.join(FORMATS)}")
    qc = quantization_config_of(model)
    if not any(isinstance(m, WQLinear) for m in model.modules()):
        raise LMCompressError("model has a quantization_config but no WQLinear modules; nothing to save")
    if format == "compressed-tensors":
        with atomic_output_dir(path, overwrite=overwrite) as tmp:
            _save_compressed_tensors(model, tmp, qc, dtype)
            _write_extras(tmp, tokenizer, extra_files, "compressed-tensors pack-quantized", qc)
        return Path(path).expanduser().resolve()
    state_dict = None
    if dtype is not None:
        state_dict, seen = {}, set()
        for k, v in model.state_dict().items():
            if v.numel() and v.data_ptr() in seen:  # a tied copy (lm_head = embeddings): the tie restores it
                continue
            seen.add(v.data_ptr())
            state_dict[k] = v.to(dtype) if v.is_floating_point() and not k.endswith(".scales") else v
    with atomic_output_dir(path, overwrite=overwrite) as tmp:
        with detached_hf_quantizer(model):
            model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        if dtype is not None:
            config_path = tmp / "config.json"
            data = json.loads(config_path.read_text())
            name = str(dtype).removeprefix("torch.")
            for key in ("dtype", "torch_dtype"):
                if key in data:
                    data[key] = name
            config_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        _write_extras(tmp, tokenizer, extra_files, "awq-gemm", qc)
    return Path(path).expanduser().resolve()


def _write_extras(folder: Path, tokenizer: Any, extra_files: dict[str, str] | None, fmt: str,
                  qc: dict[str, Any]) -> None:
    """The tokenizer, extra text files and the lmcompress marker (:data:`CHECKPOINT_MARKER`) of a saved folder."""
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    for name, text in (extra_files or {}).items():
        (folder / name).write_text(text)
    marker = {"writer": "lmcompress", "format": fmt, "quantization_config": qc}
    (folder / CHECKPOINT_MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True, default=str) + "\n")


def _save_compressed_tensors(model: nn.Module, folder: Path, qc: dict[str, Any], dtype: torch.dtype | None) -> None:
    """config.json (with the compressed-tensors quantization_config), generation config, model.safetensors."""
    from safetensors.torch import save_file

    packed = {name: m for name, m in model.named_modules() if isinstance(m, WQLinear)}
    plain_linears = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear))
    model_dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    out_dtype = dtype or model_dtype
    scale_dtype = torch.float32 if out_dtype == torch.float32 else torch.float16
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in model.state_dict().items():
        module_name = key.rpartition(".")[0]
        if module_name in packed:
            continue
        if value.numel() and value.data_ptr() in seen:  # a tied copy (lm_head = embeddings): the tie restores it
            continue
        seen.add(value.data_ptr())
        tensors[key] = value.to(out_dtype) if value.is_floating_point() else value
    for name, m in packed.items():
        for suffix, t in ct.gemm_to_ct(m.qweight, m.qzeros, m.scales, zero_point=bool(qc.get("zero_point", True)),
                                       scale_dtype=scale_dtype).items():  # fmt: skip
            tensors[f"{name}.{suffix}"] = t
        if m.bias is not None:
            tensors[f"{name}.bias"] = m.bias.to(out_dtype)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})  # fmt: skip
    config = model.config.to_dict()
    config["quantization_config"] = ct.ct_quantization_config(
        int(qc["group_size"]), bool(qc.get("zero_point", True)), plain_linears
    )
    name = str(out_dtype).removeprefix("torch.")
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = name
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(folder)


def checkpoint_format(path: str | Path) -> str | None:
    """A one-line description of a quantized checkpoint folder's weight format (e.g.
    ``"compressed-tensors pack-quantized w4 g64 asym"``); None for a folder whose config declares no AWQ or
    compressed-tensors quantization.

    Raises:
        LMCompressError: the folder declares one of them with a scheme this project does not run (named).
    """
    config_path = Path(path).expanduser() / "config.json"
    if not config_path.is_file():
        return None
    qc = json.loads(config_path.read_text()).get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") not in ("awq", ct.QUANT_METHOD):
        return None
    _, fmt = _read_quant_config(Path(path).expanduser())
    sym = "asym" if fmt["zero_point"] else "sym"
    return f"{fmt['format']} w{fmt['bits']} g{fmt['group_size']} {sym}"


def _read_quant_config(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelFileError(f"checkpoint folder {str(folder)!r} has no config.json")
    data = json.loads(config_path.read_text())
    qc = data.get("quantization_config")
    if isinstance(qc, dict) and qc.get("quant_method") == ct.QUANT_METHOD:
        fmt = ct.parse_ct_config(qc, str(config_path))
        return data, {**fmt, "format": "compressed-tensors pack-quantized"}
    if not isinstance(qc, dict) or qc.get("quant_method") != "awq":
        raise LMCompressError(
            f"{config_path} has no supported quantization_config; allowed quant_method: 'awq' (AutoAWQ GEMM) "
            f"or '{ct.QUANT_METHOD}' (W4A16 pack-quantized)"
        )
    bits = qc.get("bits", qc.get("w_bit"))
    group = qc.get("group_size", qc.get("q_group_size"))
    version = str(qc.get("version", "gemm")).lower()
    if bits not in SUPPORTED_BITS:
        raise LMCompressError(f"checkpoint bits={bits!r} is not supported; allowed: 4")
    if group not in SUPPORTED_GROUP_SIZES:
        raise LMCompressError(
            f"checkpoint group_size={group!r} is not supported; allowed: {', '.join(map(str, SUPPORTED_GROUP_SIZES))}"
        )
    if version != "gemm":
        raise LMCompressError(f"checkpoint version={version!r} is not supported; allowed: gemm")
    fmt = {"bits": bits, "group_size": group, "zero_point": bool(qc.get("zero_point", True))}
    return data, {**fmt, "format": "awq-gemm", "ignore": list(qc.get("modules_to_not_convert") or [])}


def _load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelFileError(f"checkpoint folder {str(folder)!r} has no .safetensors file")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        check_safetensors(f)
        tensors.update(load_file(str(f)))
    return tensors


def _check_packed(name: str, tensors: dict[str, torch.Tensor], linear: nn.Linear, group: int) -> None:
    k, n = linear.in_features, linear.out_features
    expected = {
        "qweight": ((k, n // PACK), torch.int32),
        "qzeros": ((k // group, n // PACK), torch.int32),
        "scales": ((k // group, n), torch.float16),
    }
    for suffix, (shape, dt) in expected.items():
        key = f"{name}.{suffix}"
        if key not in tensors:
            raise LMCompressError(f"checkpoint lacks {key}, which its config (group_size={group}) needs")
        t = tensors[key]
        if tuple(t.shape) != shape or t.dtype != dt:
            raise LMCompressError(
                f"checkpoint tensor {key} has shape {tuple(t.shape)} {t.dtype}, but its config (group_size={group}) "
                f"and the model's {k}x{n} linear need {shape} {dt}"
            )


def load_quantized(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, Any]:
    """Rebuild a model saved by :func:`save_quantized`, or any AWQ GEMM or compressed-tensors W4A16
    pack-quantized checkpoint of a supported architecture (AutoAWQ's, llm-compressor's).

    Args:
        path: the checkpoint folder.
        dtype: dtype of the non-quantized floating tensors (default: as stored).
        device: where to put the model.

    Returns:
        ``(model, tokenizer)``, the tokenizer ``None`` if the folder has none.

    Raises:
        LMCompressError: the config is not an AWQ GEMM or supported compressed-tensors config (the message names
            the scheme and what is supported), or its tensors disagree with it.
        ModelFileError: missing files.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ModelFileError(f"checkpoint folder {str(folder)!r} does not exist")
    _, fmt = _read_quant_config(folder)
    config = AutoConfig.from_pretrained(folder)
    mapping_for(config)  # an unknown architecture fails here, with the supported list
    del config.quantization_config
    tensors = _load_tensors(folder)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    group = fmt["group_size"]
    for prefix, layer in zip(_layer_prefixes(model), decoder_layers(model)):
        for name, linear in list(layer.named_modules()):
            if not isinstance(linear, nn.Linear):
                continue
            full = f"{prefix}.{name}"
            if f"{full}.weight" in tensors and f"{full}.qweight" not in tensors:
                continue  # stored unquantized (ignored / modules_to_not_convert): stays an nn.Linear
            if fmt["format"].startswith("compressed-tensors"):
                converted = ct.ct_to_gemm(tensors, full, linear.in_features, linear.out_features, group,
                                          fmt["zero_point"])  # fmt: skip
                for suffix in ct.SUFFIXES:
                    tensors.pop(f"{full}.{suffix}", None)
                tensors.update({f"{full}.{k}": v for k, v in converted.items()})
            _check_packed(full, tensors, linear, group)
            bias_key = f"{full}.bias"
            packed = WQLinear(
                linear.in_features,
                linear.out_features,
                bits=fmt["bits"],
                group_size=group,
                bias=linear.bias is not None,
                bias_dtype=tensors[bias_key].dtype if bias_key in tensors else torch.float16,
            )
            parent_name, _, child = name.rpartition(".")
            setattr(layer.get_submodule(parent_name) if parent_name else layer, child, packed)
    if getattr(config.get_text_config(), "dms_separate_alpha", False) is True:  # a DMS checkpoint's float
        from ..kv.evict.dms_hooks import (
            attach_separate_alpha,  # decision projection (not in the architecture)
        )

        attach_separate_alpha(model)
    expected = set(model.state_dict())
    unexpected = sorted(set(tensors) - expected)
    if unexpected:
        raise LMCompressError(f"checkpoint has tensors the model does not: {', '.join(unexpected[:5])}")
    missing = model.load_state_dict(tensors, strict=False, assign=True).missing_keys
    tied = getattr(config.get_text_config(), "tie_word_embeddings", False)
    if tied:
        model.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing:
        raise LMCompressError(f"checkpoint lacks tensors the model needs: {', '.join(missing[:5])}")
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise LMCompressError(f"checkpoint left parameters unset: {', '.join(still_meta[:5])}")
    model.config.quantization_config = RTNConfig(
        bits=fmt["bits"], group_size=group, zero_point=fmt["zero_point"]
    ).quantization_config()
    if dtype is not None:
        model.to(dtype)
    model.to(device).eval()
    return model, _load_tokenizer(folder)


def _layer_prefixes(model: nn.Module) -> list[str]:
    """Full module names of the decoder layers, in order."""
    names = {id(m): name for name, m in model.named_modules()}
    return [names[id(layer)] for layer in decoder_layers(model)]


def _load_tokenizer(folder: Path) -> Any:
    if not any(
        (folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    ):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)
