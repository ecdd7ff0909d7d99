"""Load a DMS checkpoint folder (a normal Hugging Face folder whose ``config.json`` has the ``dms_*`` keys) into
the standard architecture, without remote code: the settings are validated first, and with
``dms_separate_alpha`` the ``self_attn.dms_proj_alpha*`` weights (which ``from_pretrained`` does not know) are
read from the folder's safetensors files and attached (:func:`~lmcompress.kv.evict.dms_hooks.attach_separate_alpha`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ...errors import LMCompressError
from .dms_config import DMSSettings, read_settings

ALPHA_MARK = ".self_attn.dms_proj_alpha"


def alpha_state(folder: str | Path) -> dict[str, torch.Tensor]:
    """The ``*.self_attn.dms_proj_alpha*`` tensors of the folder's ``*.safetensors`` files, by name."""
    from safetensors import safe_open

    out = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                if ALPHA_MARK in name:
                    out[name] = f.get_tensor(name)
    return out


def load_alpha_weights(model: torch.nn.Module, folder: str | Path) -> None:
    """Attach the separate-alpha modules to ``model`` and fill them from ``folder``.

    Raises:
        LMCompressError: a layer's weights are missing from the folder.
    """
    from .dms_hooks import attach_separate_alpha

    tensors = alpha_state(folder)
    modules = attach_separate_alpha(model)
    with torch.no_grad():
        for module in modules:
            for sub in ("dms_proj_alpha_norm", "dms_proj_alpha"):
                for pname, param in getattr(module, sub).named_parameters():
                    suffix = f"layers.{module.layer_idx}.self_attn.{sub}.{pname}"
                    match = [t for n, t in tensors.items() if n.endswith(suffix)]
                    if not match:
                        raise LMCompressError(f"{folder!s} sets dms_separate_alpha but has no weight *.{suffix}")
                    param.copy_(match[0].to(param.dtype))


def load_dms_model(folder: str | Path, **kwargs: Any) -> tuple[torch.nn.Module, Any, DMSSettings]:
    """``(model, tokenizer, settings)`` of a DMS checkpoint folder (``kwargs`` go to
    :func:`lmcompress.models.load_model`).

    Raises:
        LMCompressError: the folder lacks ``config.json``, its DMS keys, or has impossible DMS values.
    """
    from ...models import load_model

    settings = read_settings(folder)
    model, tokenizer = load_model(str(folder), **kwargs)  # attaches separate-alpha weights (attach_folder_alpha)
    return model, tokenizer, settings


def attach_folder_alpha(model: torch.nn.Module, folder: str | Path) -> None:
    """Called by :func:`lmcompress.models.load_model` for every folder: when its ``config.json`` sets
    ``dms_separate_alpha``, validate the DMS settings and load the separate-alpha weights into ``model``
    (``from_pretrained`` drops them as unknown); any other folder is left as it is.

    Raises:
        LMCompressError: impossible DMS settings, or separate-alpha weights missing from the folder.
    """
    import json

    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if isinstance(config, dict) and config.get("dms_separate_alpha") is True:
        read_settings(folder)
        load_alpha_weights(model, folder)
