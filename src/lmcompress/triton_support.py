"""Whether Triton can be used in this process (one answer for the KV and the weight kernels)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


@functools.cache
def triton_available() -> bool:
    """True when ``import triton`` succeeds (kernels then run on CUDA tensors, or anywhere under
    ``TRITON_INTERPRET=1``). Imports Triton on the first call only, never at import of lmcompress."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def on_tensor_device(fn: F) -> F:
    """Decorate a kernel-launching function so it runs with the CUDA device of its first tensor argument current:
    Triton launches on the current device, and a model spread over several GPUs has layers on each. Tensors off
    CUDA (the interpreter's CPU tensors) and the current device already right cost one check."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import torch

        t = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if t is None or not t.is_cuda or t.device.index == torch.cuda.current_device():
            return fn(*args, **kwargs)
        with torch.cuda.device(t.device):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
