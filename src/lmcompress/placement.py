"""One model placed over several devices (QAQ's ``device_configs``) through accelerate's device map.

Two ways to say it (grid file keys, or :func:`parse_placement`'s arguments):

* ``devices: {cuda:0: 20GiB, cuda:1: 20GiB}``: a memory cap per device; accelerate's
  ``infer_auto_device_map`` fills the devices in order, whole decoder layers at a time (the model's
  ``_no_split_modules``), and a model that does not fit the caps is an error (nothing goes to disk);
* ``device_map: {model.embed_tokens: cuda:0, model.layers.0: cuda:0, ..., lm_head: cuda:1}``: an explicit map
  of module names to devices covering every parameter.

:func:`place_model` then calls accelerate's ``dispatch_model`` with ``force_hooks=True``, so every mapped module
gets accelerate's device hook (inputs moved to the module's device) also when all entries name one device. The
model is loaded on the CPU first and then dispatched (a model too large for this host's memory is out of scope).
A ``cpu`` entry beside GPU entries is accelerate's CPU offload: weights stay in CPU memory and run on the first
GPU. Caches allocate each layer's storage on the device of the key/value states that layer produces (so on the
layer's device), and eviction scores are computed from that layer's tensors, where they live.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import LMCompressError
from .sizes import parse_bytes


@dataclass(frozen=True)
class Placement:
    """``caps``: device -> bytes (accelerate's ``max_memory``), or ``layers``: module name -> device."""

    caps: dict[str, int] = field(default_factory=dict)
    layers: dict[str, str] = field(default_factory=dict)

    def devices(self) -> list[str]:
        """The devices named, in first-seen order."""
        return list(dict.fromkeys(self.caps or self.layers.values()))

    def to_dict(self) -> dict[str, Any]:
        return {"devices": dict(self.caps)} if self.caps else {"device_map": dict(self.layers)}


def _device(value: Any, where: str) -> str:
    """A device name of this machine (``cpu``, ``cuda:N``; an int N means ``cuda:N``), normalized."""
    from .devices import check_device

    text = f"cuda:{value}" if isinstance(value, int) and not isinstance(value, bool) else str(value)
    check_device(text, option=where)
    return str(torch.device(text)) if text != "cuda" else "cuda:0"


def parse_placement(devices: Any = None, device_map: Any = None, *, where: str = "") -> Placement | None:
    """The :class:`Placement` of a grid's ``devices`` (device -> cap) or ``device_map`` (module -> device), or
    None when neither is given. ``where`` prefixes the key names in error messages.

    Raises:
        LMCompressError: both given, not a mapping, an empty mapping, a device this machine lacks or that is not
            a device name, a cap that is not a size. Layer names are checked by :func:`check_layer_names`.
    """
    if devices is None and device_map is None:
        return None
    if devices is not None and device_map is not None:
        raise LMCompressError(f"{where}devices and {where}device_map are both given; allowed: one of them")
    name = "devices" if devices is not None else "device_map"
    value = devices if devices is not None else device_map
    if not isinstance(value, dict) or not value:
        raise LMCompressError(f"{where}{name}={value!r} is not a non-empty mapping; allowed: e.g. "
                              + ("{cuda:0: 20GiB, cuda:1: 20GiB}" if devices is not None
                                 else "{model.embed_tokens: cuda:0, model.layers.0: cuda:0, ...}"))
    if devices is not None:
        caps: dict[str, int] = {}
        for dev, cap in value.items():
            caps[_device(dev, f"{where}devices")] = parse_bytes(cap, f"{where}devices.{dev}")
        return Placement(caps=caps)
    layers = {}
    for module, dev in value.items():
        layers[str(module)] = _device(dev, f"{where}device_map.{module}")
    return Placement(layers=layers)


def check_layer_names(model: torch.nn.Module, placement: Placement, *, where: str = "") -> None:
    """An explicit map must name modules of ``model`` and cover every parameter and buffer.

    Raises:
        LMCompressError: a name that is no module of the model (with the top-level names allowed), or a
            parameter no entry covers.
    """
    if not placement.layers:
        return
    modules = dict(model.named_modules())
    top = [n for n, _ in model.named_modules() if n and n.count(".") <= 2][:12]
    for name in placement.layers:
        if name not in modules or name == "":
            raise LMCompressError(f"{where}device_map: {name!r} is not a module of the model; allowed: module "
                                  f"names such as {', '.join(top)}, ...")
    prefixes = tuple(f"{n}." for n in placement.layers)
    for pname, _ in [*model.named_parameters(), *model.named_buffers()]:
        if not pname.startswith(prefixes):
            owner = pname.rsplit(".", 1)[0]
            raise LMCompressError(f"{where}device_map: no entry covers {pname!r}; allowed: a map whose module "
                                  f"names cover every parameter (add {owner!r} or a module above it)")


def _accelerate_key(device: str) -> int | str:
    """``cuda:N`` -> N (accelerate's GPU keys), ``cpu`` -> ``cpu``."""
    d = torch.device(device)
    if d.type == "cuda":
        return d.index if d.index is not None else 0
    return d.type


def device_map_for(model: torch.nn.Module, placement: Placement, dtype: torch.dtype | None = None
                   ) -> dict[str, int | str]:
    """The accelerate device map of ``placement`` for ``model`` (explicit, or inferred from the caps)."""
    if placement.layers:
        check_layer_names(model, placement)
        return {name: (_accelerate_key(dev) if dev.startswith("cuda") else dev)
                for name, dev in placement.layers.items()}
    from accelerate import infer_auto_device_map

    max_memory = {_accelerate_key(d): cap for d, cap in placement.caps.items()}
    inferred = infer_auto_device_map(model, max_memory=max_memory, dtype=dtype,
                                     no_split_module_classes=list(getattr(model, "_no_split_modules", None) or []))
    spill = sorted({str(v) for v in inferred.values()} - {str(k) for k in max_memory})
    if spill:
        caps = ", ".join(f"{d}: {c / 2**30:.2f}GiB" for d, c in placement.caps.items())
        raise LMCompressError(f"devices {{{caps}}}: the model does not fit these caps (accelerate placed part of "
                              f"it on {', '.join(spill)}); allowed: larger caps or more devices")
    return dict(inferred)


def place_model(model: torch.nn.Module, placement: Placement) -> torch.nn.Module:
    """Dispatch ``model`` (loaded on the CPU) over ``placement``'s devices with accelerate's hooks on every mapped
    module; sets ``model.hf_device_map``. Returns the model."""
    from accelerate import dispatch_model

    dtype = next(model.parameters()).dtype
    device_map = device_map_for(model, placement, dtype)
    quiet = all(str(d) == "cpu" for d in device_map.values())
    logger = logging.getLogger("accelerate.big_modeling")
    level = logger.level
    if quiet:  # accelerate warns of "parameters offloaded to the cpu" also when all of them run there (none is)
        logger.setLevel(logging.ERROR)
    try:
        return dispatch_model(model, device_map=device_map, force_hooks=True)
    finally:
        logger.setLevel(level)


def _device_name(d: int | str | torch.device) -> str:
    """An accelerate device-map value as a name: ``1`` -> ``cuda:1``; ``cpu``, ``disk``, ``cuda:0`` as they are."""
    if isinstance(d, int) and not isinstance(d, bool):
        return f"cuda:{d}"
    return str(d) if str(d) in ("cpu", "disk") else str(torch.device(d))


def model_devices(model: torch.nn.Module) -> list[str]:
    """The devices a model's weights are placed on, in first-seen order: the values of its accelerate device map
    if it has one (``cpu`` beside GPUs included: offloaded weights), else its parameters' devices."""
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        return list(dict.fromkeys(_device_name(d) for d in device_map.values()))
    return list(dict.fromkeys(str(p.device) for p in model.parameters()))


def check_model_placement(name: str, placement: Placement, *, where: str = "") -> None:
    """The layer names of an explicit map, checked against model ``name``'s module tree built without weights
    (accelerate's empty-weights context), so a bad name is reported before any model loads.

    Raises:
        LMCompressError: as :func:`check_layer_names`.
    """
    if not placement.layers:
        return
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from .models import TINY_MODELS, _resolve_source, _tiny_config

    if name in TINY_MODELS:
        config = _tiny_config(name.removeprefix("tiny-"))
    else:
        folder, gguf_file = _resolve_source(name)
        config = AutoConfig.from_pretrained(folder, **({"gguf_file": gguf_file} if gguf_file else {}))
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    check_layer_names(skeleton, placement, where=where)
