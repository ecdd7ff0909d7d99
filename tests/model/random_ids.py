"""Random token ids for the model-tier tests."""

from __future__ import annotations

import torch


def ids(n: int, seed: int = 0) -> torch.Tensor:
    """``[1, n]`` token ids below 256 from a generator seeded with ``seed``."""
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(seed))
