"""``fuse_decoder(model)``: swap Llama attention and gated-MLP modules for fused equivalents, fewer and larger
kernels per decode step (BENCHMARKS.md section 5.5: a batch-1 step of an 8B Llama was ~1900 kernels, most of
them tiny).

* :class:`FusedAttention`: q, k and v from one concatenated projection (one GEMV instead of three, for plain
  ``nn.Linear`` and for 4-bit ``WQLinear`` projections; other kinds stay separate), RoPE on q and k in one Triton kernel that also
  writes them in attention's ``[B, H, S, D]`` layout (:mod:`.rope_kernel`); then the cache update, the model's
  attention function and ``o_proj`` as transformers does.
* :class:`FusedMLP`: gate and up from one concatenated projection, ``silu(gate) * up`` in one Triton kernel
  (:mod:`.swiglu_kernel`), ``down_proj``; long prefills in chunks of 4096 tokens (bounds the intermediates).

Module instances are replaced (as :func:`~lmcompress.fused.fuse_rmsnorm` does); the model classes are untouched.
Which modules qualify is decided in :mod:`lmcompress._compat`. Approximate: a concatenated projection may sum in
another order than the separate ones (cuBLAS picks its own split), and SiLU's ``exp`` is the hardware's; RoPE is
exact. Off CUDA (and without the interpreter) the Triton kernels fall back to transformers' torch arithmetic.
Hooks on ``q_proj``/``k_proj``/``v_proj`` (DMS, KVzip scoring) do not see a concatenated projection: policies that
need them find no separate projections (``_compat.pre_rope_key_value_modules`` returns None) and refuse.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .. import _compat
from ..triton_support import triton_available


def _kernels_usable(x: torch.Tensor) -> bool:
    on_device = x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    return on_device and x.dtype in (torch.float16, torch.bfloat16, torch.float32) and triton_available()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``q: [B, S, Hq, D]``, ``k: [B, S, Hkv, D]``, ``cos``/``sin``: ``[B or 1, S, D]`` -> rotated q and k in
    ``[B, H, S, D]`` layout (contiguous): one Triton kernel where usable, else transformers' arithmetic."""
    if _kernels_usable(q) and q.shape[-1] % 2 == 0:
        from .rope_kernel import rope_qk

        return rope_qk(q, k, cos, sin)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return ((q * cos) + (rotate_half(q) * sin)).contiguous(), ((k * cos) + (rotate_half(k) * sin)).contiguous()


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (``[..., I]`` each): one Triton kernel where usable, else torch's two."""
    if _kernels_usable(gate):
        from .swiglu_kernel import swiglu as kernel

        return kernel(gate, up)
    return nn.functional.silu(gate) * up


def _concat_wqlinear(parts: list[nn.Module]) -> nn.Module | None:
    """One ``WQLinear`` whose outputs are ``parts``' outputs side by side (AutoAWQ's GEMM layout packs 8 output
    columns per int32 and every part has a multiple of 8 columns, so codes, zeros and scales concatenate along
    the output dim), or None unless the parts agree in input size, group size, device and bias presence."""
    from ..weights.linear import WQLinear

    if not all(type(p) is WQLinear for p in parts):
        return None
    first = parts[0]
    has_bias = first.bias is not None
    if any(p.in_features != first.in_features or p.group_size != first.group_size
           or p.qweight.device != first.qweight.device or (p.bias is not None) != has_bias for p in parts):
        return None
    fused = WQLinear(first.in_features, sum(p.out_features for p in parts), group_size=first.group_size,
                     bias=has_bias, bias_dtype=first.bias.dtype if has_bias else torch.float16, device="meta")
    for name in ("qweight", "qzeros", "scales") + (("bias",) if has_bias else ()):
        fused._buffers[name] = torch.cat([p._buffers[name] for p in parts], dim=-1)
    return fused


def _concat_linear(parts: list[nn.Module]) -> nn.Module | None:
    """One ``nn.Linear`` (or ``WQLinear``) whose outputs are ``parts``' outputs side by side, or None unless every
    part is a plain ``nn.Linear`` (every part a ``WQLinear``) with the same input size, dtype, device and bias
    presence."""
    if not all(type(p) is nn.Linear for p in parts):
        return _concat_wqlinear(parts)
    w0 = parts[0].weight
    has_bias = parts[0].bias is not None
    if any(p.in_features != parts[0].in_features or p.weight.dtype != w0.dtype or p.weight.device != w0.device
           or (p.bias is not None) != has_bias for p in parts):
        return None
    out = sum(p.out_features for p in parts)
    fused = nn.Linear(parts[0].in_features, out, bias=has_bias, device="meta")
    with torch.no_grad():
        fused.weight = nn.Parameter(torch.cat([p.weight for p in parts], dim=0), requires_grad=False)
        if has_bias:
            fused.bias = nn.Parameter(torch.cat([p.bias for p in parts], dim=0), requires_grad=False)
    return fused


class FusedAttention(nn.Module):
    """Llama attention with a concatenated q/k/v projection (where possible) and fused RoPE.

    Args:
        attn: the transformers attention module it replaces (its projections are reused or concatenated).
        concat: concatenate plain ``nn.Linear`` q/k/v projections into ``qkv_proj``.
    """

    def __init__(self, attn: nn.Module, concat: bool = True) -> None:
        super().__init__()
        self.config = attn.config
        self.layer_idx = attn.layer_idx
        self.head_dim = attn.head_dim
        self.num_key_value_groups = attn.num_key_value_groups
        self.scaling = attn.scaling
        self.attention_dropout = attn.attention_dropout
        self.is_causal = True
        self.q_size = attn.q_proj.out_features if hasattr(attn.q_proj, "out_features") else None
        self.kv_size = attn.k_proj.out_features if hasattr(attn.k_proj, "out_features") else None
        fused = _concat_linear([attn.q_proj, attn.k_proj, attn.v_proj]) if concat else None
        if fused is not None:
            self.qkv_proj = fused
        else:
            self.q_proj, self.k_proj, self.v_proj = attn.q_proj, attn.k_proj, attn.v_proj
        self.o_proj = attn.o_proj

    def _qkv(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if hasattr(self, "qkv_proj"):
            return self.qkv_proj(hidden_states).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        return self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None, past_key_values=None, cache=None,
                cache_position: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``hidden_states: [B, S, hidden]`` -> ``([B, S, hidden], attention weights or None)``; keywords as
        transformers' Llama decoder layer passes them (``cache`` from 5.24, ``past_key_values`` before)."""
        cache = cache if cache is not None else past_key_values
        input_shape = hidden_states.shape[:-1]
        shape = (*input_shape, -1, self.head_dim)
        q, k, v = self._qkv(hidden_states)
        cos, sin = position_embeddings
        query, key = apply_rope(q.view(shape), k.view(shape), cos, sin)
        value = v.view(shape).transpose(1, 2)
        del q, k, v  # views of the [B, S, q + 2 kv] projection: it is freed once the cache holds K/V
        if cache is not None:
            key, value = _compat.update_cache(cache, key, value, self.layer_idx, cos, sin, cache_position)
        attn_output, attn_weights = _compat.attention_function(self.config)(
            self, query, key, value, attention_mask, dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling, **kwargs)
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class FusedMLP(nn.Module):
    """``down_proj(silu(gate) * up)`` with gate and up from one concatenated projection (where possible).

    Args:
        mlp: the transformers gated MLP it replaces (SiLU activation).
        concat: concatenate plain ``nn.Linear`` gate/up projections into ``gate_up_proj``.
    """

    def __init__(self, mlp: nn.Module, concat: bool = True) -> None:
        super().__init__()
        fused = _concat_linear([mlp.gate_proj, mlp.up_proj]) if concat else None
        if fused is not None:
            self.gate_up_proj = fused
            self.intermediate = mlp.gate_proj.out_features
        else:
            self.gate_proj, self.up_proj = mlp.gate_proj, mlp.up_proj
        self.down_proj = mlp.down_proj

    #: rows (tokens) per chunk when a forward has more: the ``[rows, 2 x intermediate]`` projection of a 32k
    #: prefill is 1.75 GiB in bf16 (8B shape), 4096 rows 0.22 GiB. Rows are independent, so chunking computes the
    #: same function (cuBLAS may pick another kernel for the chunk's shape: last-place rounding can differ).
    max_rows: int | None = 4096

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., hidden]`` -> ``[..., hidden]``."""
        rows = x.numel() // x.shape[-1]
        if self.max_rows is None or rows <= self.max_rows:
            return self._mlp(x)
        flat = x.reshape(rows, x.shape[-1])
        first = self._mlp(flat[: self.max_rows])
        out = first.new_empty((rows, first.shape[-1]))
        out[: self.max_rows] = first
        del first
        for i in range(self.max_rows, rows, self.max_rows):
            out[i : i + self.max_rows] = self._mlp(flat[i : i + self.max_rows])
        return out.view(*x.shape[:-1], out.shape[-1])

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "gate_up_proj"):
            gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(swiglu(gate, up))


def fuse_decoder(model: nn.Module, *, concat: bool = True) -> dict[str, int]:
    """Replace every qualifying attention and MLP module of ``model`` (see :mod:`lmcompress._compat`); returns
    ``{"attention": n, "mlp": m}``. ``concat=False`` keeps the projections separate (fused RoPE and SwiGLU
    only). The concatenated weights replace the separate ones (same bytes once the old ones are freed)."""
    counts = {"attention": 0, "mlp": 0}
    for parent, name, module in _compat.llama_attention_modules(model):
        setattr(parent, name, FusedAttention(module, concat))
        counts["attention"] += 1
    for parent, name, module in _compat.silu_mlp_modules(model):
        setattr(parent, name, FusedMLP(module, concat))
        counts["mlp"] += 1
    return counts
