"""``WQLinear``: a linear layer holding 4-bit weights in AutoAWQ's GEMM layout (see :mod:`.packing`).

Forward: on CUDA with float16/bfloat16 inputs the Triton W4A16 kernels run (:mod:`.kernels`); everywhere else
the torch path dequantizes the weight for the call and runs ``F.linear`` (memory stays packed at rest; the
float weight of one layer exists only during its call).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LMCompressError
from .packing import PACK, dequantize_gemm, pack_gemm
from .quantizer import QuantizedWeight


class WQLinear(nn.Module):
    """4-bit weight-only quantized linear, AutoAWQ GEMM layout.

    Buffers (their names and shapes are the checkpoint format):
        qweight: int32 ``[in_features, out_features // 8]``.
        qzeros: int32 ``[in_features // group_size, out_features // 8]``.
        scales: float16 ``[in_features // group_size, out_features]``.
        bias: ``[out_features]`` in the model's dtype, or absent.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bits: int = 4,
        group_size: int = 128,
        bias: bool = False,
        bias_dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if bits != 4:
            raise LMCompressError(f"bits={bits!r} is not supported by WQLinear; allowed: 4")
        if in_features % group_size:
            raise LMCompressError(
                f"group_size={group_size} does not divide in_features={in_features}; use a group size that divides it"
            )
        if out_features % PACK:
            raise LMCompressError(
                f"out_features={out_features} is not a multiple of 8, which the GEMM layout needs"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        groups = in_features // group_size
        self.register_buffer(
            "qweight", torch.zeros(in_features, out_features // PACK, dtype=torch.int32, device=device)
        )
        self.register_buffer(
            "qzeros", torch.zeros(groups, out_features // PACK, dtype=torch.int32, device=device)
        )
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device))
        else:
            self.bias = None

    @classmethod
    def from_quantized(cls, q: QuantizedWeight, bias: torch.Tensor | None = None) -> WQLinear:
        """Build from an ``[out, in]`` :class:`QuantizedWeight` (and the original linear's bias)."""
        out_features, in_features = q.codes.shape
        module = cls(
            in_features,
            out_features,
            group_size=q.group_size,
            bias=bias is not None,
            bias_dtype=bias.dtype if bias is not None else torch.float16,
            device=q.codes.device,
        )
        qweight, qzeros, scales = pack_gemm(q.codes, q.zeros, q.scales)
        module.qweight.copy_(qweight)
        module.qzeros.copy_(qzeros)
        module.scales.copy_(scales)
        if bias is not None:
            module.bias.copy_(bias.detach())
        return module

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        """Keep ``scales`` float16 under ``.to(dtype)`` / ``.half()`` / ``.bfloat16()`` (the format stores them
        so; a cast through bfloat16 would lose precision): only their device follows ``fn``."""
        scales = self._buffers["scales"]
        result = super()._apply(fn, recurse)
        moved = self._buffers["scales"]
        if moved.dtype != torch.float16:
            self._buffers["scales"] = scales.to(moved.device)
        return result

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as ``[out_features, in_features]`` (``nn.Linear`` orientation) in ``dtype``."""
        return dequantize_gemm(self.qweight, self.qzeros, self.scales, self.group_size, dtype).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[..., in_features]`` -> ``[..., out_features]`` in ``x``'s dtype."""
        if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
            from .kernels import triton_available, w4a16_matmul

            if triton_available():
                out = w4a16_matmul(
                    x.reshape(-1, self.in_features),
                    self.qweight,
                    self.qzeros,
                    self.scales,
                    self.group_size,
                    self.bias,
                )
                return out.reshape(*x.shape[:-1], self.out_features)
        weight = self.dequantize(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)

    @property
    def nbytes(self) -> int:
        """Bytes held by this layer's tensors (packed codes, zeros, scales, bias)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}"
        )
