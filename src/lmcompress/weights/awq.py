"""AWQ: activation-aware weight quantization (Lin et al., 2023), following llm-awq / AutoAWQ.

Per decoder layer, on the inputs the full-precision model gives it (layer ``i + 1`` sees the float output of
layer ``i``, as in llm-awq):

1. Record the input of every linear on the calibration tokens.
2. For each scale group of the architecture (:mod:`.mappings`), search ``alpha`` on the grid
   ``{0, 1/n, ..., (n-1)/n}`` (``alpha = 0`` gives ``s = 1``, the identity): ``s = mean|x|^alpha`` (or AutoAWQ's
   duo form), normalized by ``sqrt(max(s) * min(s))``; the loss is the mean squared error of the group's block
   output (the whole self-attention for norm -> q/k/v, the MLP for norm -> gate/up, the linear itself for
   linear -> linear) when the group's linears hold ``Q(W * s) / s``. Groups are searched on the unscaled layer,
   then all applied (:mod:`.smooth`), and the recorded inputs divided by ``s``.
3. Clip search (:mod:`.clip`) on every linear except those producing queries and keys.
4. Round-to-nearest quantization to the packed format.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .._compat import decoder_layers, layer_output_hidden, text_config
from .calibration import calibration_tokens, capture_layer_inputs, move_to
from .clip import apply_clip, search_clip
from .config import AWQConfig
from .mappings import ArchMapping, ScaleGroup, mapping_for
from .quantize import QuantizeReport, layer_linears, on_device, register_handler, replace_with_packed
from .quantizer import fake_quantize
from .smooth import apply_group_scale, group_applies, group_modules


def accepted_kwargs(module: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``kwargs`` that ``module.forward`` accepts (all of them if it takes ``**kwargs``)."""
    params = inspect.signature(module.forward).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def _block_forward(
    block: nn.Module, x: torch.Tensor, kwargs: dict[str, Any], batch: int
) -> list[torch.Tensor]:
    outs = []
    for s in range(0, x.shape[0], batch):
        out = block(x[s : s + batch], **kwargs)
        outs.append(out[0] if isinstance(out, tuple) else out)
    return outs


@torch.no_grad()
def collect_inputs(
    layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any], batch: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Run ``layer`` on ``hidden`` (``[n, seq, d]``) in chunks of ``batch`` samples.

    Returns:
        ``(inputs, output)``: ``inputs[name]`` is the ``[n, seq, in_features]`` input of each linear (linears fed
        the same tensor share one), ``output`` the layer's ``[n, seq, d]`` output.
    """
    linears = layer_linears(layer)
    chunks: dict[str, list[torch.Tensor]] = {name: [] for name in linears}

    def recorder(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            chunks[name].append(args[0].detach())

        return hook

    handles = [linear.register_forward_pre_hook(recorder(name)) for name, linear in linears.items()]
    try:
        outs = [
            layer_output_hidden(layer(hidden[s : s + batch], **kwargs))
            for s in range(0, hidden.shape[0], batch)
        ]
    finally:
        for h in handles:
            h.remove()
    merged: dict[tuple[int, ...], torch.Tensor] = {}
    inputs = {}
    for name, parts in chunks.items():
        key = tuple(id(p) for p in parts)
        if key not in merged:
            merged[key] = torch.cat(parts, dim=0)
        inputs[name] = merged[key]
    return inputs, torch.cat(outs, dim=0)


def channel_abs_mean(x: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """``mean |x|`` per channel over all tokens of ``x`` (``[..., C]``), in float32."""
    flat = x.reshape(-1, x.shape[-1])
    total = torch.zeros(flat.shape[-1], dtype=torch.float32, device=x.device)
    rows = max(1, (batch * 2**20) // max(1, flat.shape[-1]))
    for s in range(0, flat.shape[0], rows):
        total += flat[s : s + rows].float().abs().sum(dim=0)
    return total / flat.shape[0]


def weight_abs_mean(linears: list[nn.Linear], group_size: int) -> torch.Tensor:
    """AutoAWQ's ``w_mean``: ``|w|`` normalized by its group's max, averaged over all rows of ``linears``."""
    weight = torch.cat([fc.weight.data for fc in linears], dim=0).float()
    grouped = weight.abs().reshape(-1, group_size)
    normalized = grouped / (grouped.amax(dim=1, keepdim=True) + 1e-6)
    return normalized.reshape(weight.shape).mean(dim=0)


def candidate_scales(x_mean: torch.Tensor, w_mean: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """Scales for grid point ``alpha``: ``x_mean^alpha`` (``/ (w_mean^(1-alpha) + 1e-4)`` in duo mode), clamped
    at 1e-4 and normalized by ``sqrt(max * min)``; non-finite entries become 1."""
    if w_mean is None:
        s = x_mean.pow(alpha).clamp(min=1e-4)
    else:
        s = (x_mean.pow(alpha) / (w_mean.pow(1 - alpha) + 1e-4)).clamp(min=1e-4)
    s = s / (s.max() * s.min()).sqrt()
    return torch.where(torch.isfinite(s), s, torch.ones_like(s))


@torch.no_grad()
def search_scale(
    layer: nn.Module, group: ScaleGroup, x: torch.Tensor, kwargs: dict[str, Any], config: AWQConfig
) -> tuple[torch.Tensor, float, list[float]]:
    """Grid search of the smoothing scales of one group.

    Args:
        x: ``[n, seq, C]`` input of the group's linears.

    Returns:
        ``(scales [C] float32, best alpha, loss per grid point)``.
    """
    _, linears = group_modules(layer, group)
    block = layer.get_submodule(group.inspect) if group.inspect else linears[0]
    block_kwargs = accepted_kwargs(block, kwargs) if group.inspect else {}
    batch = config.calib_batch
    x_mean = channel_abs_mean(x)
    w_mean = weight_abs_mean(linears, config.group_size) if config.duo_scaling else None
    reference = _block_forward(block, x, block_kwargs, batch)
    count = sum(r.numel() for r in reference)
    originals = [fc.weight.data for fc in linears]
    best_loss, best_alpha, best_scales = float("inf"), -1.0, None
    losses = []
    try:
        for step in range(config.n_grid):
            alpha = step / config.n_grid
            s = candidate_scales(x_mean, w_mean, alpha)
            for fc, w0 in zip(linears, originals):
                scaled = w0.float() * s[None, :]
                q = fake_quantize(scaled, config.bits, config.group_size, config.zero_point)
                fc.weight.data = (q / s[None, :]).to(w0.dtype)
            outs = _block_forward(block, x, block_kwargs, batch)
            loss = sum(float((o.float() - r.float()).pow(2).sum()) for o, r in zip(outs, reference)) / count
            losses.append(loss)
            if loss < best_loss:
                best_loss, best_alpha, best_scales = loss, alpha, s
    finally:
        for fc, w0 in zip(linears, originals):
            fc.weight.data = w0
    if best_scales is None:
        raise RuntimeError(
            f"AWQ scale search for {group.prev} -> {group.linears} found no finite loss: {losses}"
        )
    return best_scales, best_alpha, losses


@torch.no_grad()
def awq_layer(
    layer: nn.Module,
    hidden: torch.Tensor,
    kwargs: dict[str, Any],
    mapping: ArchMapping,
    config: AWQConfig,
    model_config: Any,
) -> tuple[torch.Tensor, dict[str, Any], int]:
    """Search, smooth, clip and pack one decoder layer.

    Returns:
        ``(next_hidden [n, seq, d], details, linears replaced)``; ``next_hidden`` is the float layer's output.
    """
    inputs, next_hidden = collect_inputs(layer, hidden, kwargs, config.calib_batch)
    details: dict[str, Any] = {"alpha": {}, "skipped": []}
    chosen = []
    for group in mapping.groups:
        if not group_applies(layer, group, model_config):
            details["skipped"].append(group.prev)
            continue
        s, alpha, _ = search_scale(layer, group, inputs[group.linears[0]], kwargs, config)
        chosen.append((group, s))
        details["alpha"][group.prev] = alpha
    for group, s in chosen:
        apply_group_scale(layer, group, s, mapping, model_config)
        for t in {id(inputs[n]): inputs[n] for n in group.linears}.values():
            t.div_(s.to(t.dtype))
    if config.clip:
        for name, linear in layer_linears(layer).items():
            if name in mapping.no_clip:
                continue
            bounds = search_clip(
                linear.weight.data,
                inputs[name],
                bits=config.bits,
                group_size=config.group_size,
                zero_point=config.zero_point,
                grid=config.clip_grid,
                max_shrink=config.clip_max_shrink,
                n_tokens=config.clip_tokens,
            )
            apply_clip(linear, bounds)
    del inputs
    replaced = replace_with_packed(layer, config)
    return next_hidden, details, replaced


@register_handler(AWQConfig)
def quantize_awq(
    model: nn.Module,
    config: AWQConfig,
    *,
    tokenizer: Any = None,
    calibration: torch.Tensor | None = None,
    device: torch.device,
    progress: bool = True,
) -> QuantizeReport:
    """Run AWQ on every decoder layer of ``model`` in order, each on ``device`` while it is processed."""
    mapping = mapping_for(model.config)
    if calibration is None:
        calibration = calibration_tokens(
            tokenizer,
            config.calib_source,
            config.calib_samples,
            config.calib_seq_len,
            config.seed,
            vocab_size=getattr(text_config(model.config), "vocab_size", None),
        )
    hidden, layer_kwargs = capture_layer_inputs(model, calibration, config.calib_batch)
    report = QuantizeReport(method="awq")
    layers = decoder_layers(model)
    for i, layer in enumerate(tqdm(layers, desc="AWQ", unit="layer", disable=not progress)):
        with on_device(layer, device):
            hidden = hidden.to(device)
            kwargs = move_to(layer_kwargs[i], device)
            hidden, details, replaced = awq_layer(layer, hidden, kwargs, mapping, config, model.config)
        report.layers += 1
        report.linears += replaced
        report.details.append({"layer": i, **details})
    return report
