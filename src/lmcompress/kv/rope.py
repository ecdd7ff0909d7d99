"""Access to the model's rotary position embedding for policies that need pre-RoPE queries
(ExpectedAttention): un-rotating post-RoPE queries and averaging the rotation over future positions.

Every supported architecture applies RoPE in the "rotate half" layout: for the first ``r`` channels
(``r = rotary_dim``, all of them unless the model rotates only part, as Phi-3 can),
``x' = x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = [-x2, x1]``; the other channels pass through.
"""

from __future__ import annotations

import torch

from .. import _compat


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RopeTable:
    """The RoPE of one model.

    Args:
        model: the model whose ``rotary_emb`` is used (see :func:`lmcompress._compat.rotary_embedding`).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.rotary = _compat.rotary_embedding(model)
        self.config = model.config

    @property
    def available(self) -> bool:
        return self.rotary is not None

    def cos_sin(self, positions: torch.Tensor, layer_idx: int, device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` ``[P, r]`` float32 at ``positions: [P]``."""
        if self.rotary is None:
            from ..errors import LMCompressError

            raise LMCompressError("this model has no rotary embedding module; pre-RoPE queries are unavailable")
        return _compat.rotary_cos_sin(self.rotary, self.config, layer_idx, positions, device)

    def unrotate(self, x: torch.Tensor, positions: torch.Tensor, layer_idx: int) -> torch.Tensor:
        """Undo RoPE: ``x: [..., P, D]`` post-RoPE states at ``positions: [P]`` -> the pre-RoPE states (float32).

        Exact up to float rounding; the inverse of ``a * R(theta)`` is ``a * R(-theta) / a**2`` where ``a`` is the
        model's attention scaling folded into cos/sin.
        """
        cos, sin = self.cos_sin(positions, layer_idx, x.device)
        r = cos.shape[-1]
        x = x.float()
        rot, rest = x[..., :r], x[..., r:]
        norm2 = cos * cos + sin * sin
        back = (rot * cos - rotate_half(rot) * sin) / norm2
        return torch.cat((back, rest), dim=-1)

    def rotate(self, x: torch.Tensor, positions: torch.Tensor, layer_idx: int) -> torch.Tensor:
        """Apply RoPE: ``x: [..., P, D]`` pre-RoPE states -> the states at ``positions: [P]`` (float32); the
        inverse of :meth:`unrotate`."""
        cos, sin = self.cos_sin(positions, layer_idx, x.device)
        r = cos.shape[-1]
        x = x.float()
        rot, rest = x[..., :r], x[..., r:]
        return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)

    def mean_rotation(self, positions: torch.Tensor, layer_idx: int, head_dim: int, device: torch.device
                      ) -> torch.Tensor:
        """``[D, D]`` float32: the average over ``positions`` of the matrix that applies RoPE at a position
        (identity on channels that are not rotated)."""
        cos, sin = self.cos_sin(positions, layer_idx, device)
        r = cos.shape[-1]
        half = r // 2
        eye = torch.eye(r, device=device)
        swap = torch.zeros(r, r, device=device)
        swap[half:, :half] = torch.eye(half, device=device)
        swap[:half, half:] = -torch.eye(half, device=device)
        rot = (cos.unsqueeze(-1) * eye + sin.unsqueeze(-1) * swap).mean(dim=0)  # row i scaled by cos_i / sin_i
        out = torch.eye(head_dim, device=device)
        out[:r, :r] = rot
        return out
