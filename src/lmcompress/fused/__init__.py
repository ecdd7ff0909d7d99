"""Fused replacements for small transformers modules whose many tiny kernels bound a decode step (see
BENCHMARKS.md section 5.5). Importing this package does not import Triton."""

from __future__ import annotations

from .decoder import FusedAttention, FusedMLP, fuse_decoder
from .rmsnorm import FusedRMSNorm, fuse_rmsnorm

__all__ = ["FusedAttention", "FusedMLP", "FusedRMSNorm", "fuse_decoder", "fuse_rmsnorm"]
