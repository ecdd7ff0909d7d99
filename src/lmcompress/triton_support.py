"""Whether Triton can be used in this process (one answer for the KV and the weight kernels)."""

from __future__ import annotations

import functools


@functools.cache
def triton_available() -> bool:
    """True when ``import triton`` succeeds (kernels then run on CUDA tensors, or anywhere under
    ``TRITON_INTERPRET=1``). Imports Triton on the first call only, never at import of lmcompress."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
