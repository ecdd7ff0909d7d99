"""Evaluation tasks (one file each, registered by name in ``TASKS``)."""

from . import (
    decode_cost,
    kv_error,
    longbench,
    multiple_choice,
    needle_grid,
    ruler_cwe,
    ruler_fwe,
    ruler_niah,
    ruler_qa,
    ruler_suite,
    ruler_vt,
)
from .base import RunContext, Task, TaskResult
from .decode_cost import DecodeCost
from .kv_error import KVError
from .multiple_choice import MultipleChoice
from .passkey import Passkey
from .perplexity import Perplexity

__all__ = ["DecodeCost", "KVError", "MultipleChoice", "Passkey", "Perplexity", "RunContext", "Task", "TaskResult",
           "decode_cost", "kv_error", "longbench", "multiple_choice", "needle_grid", "ruler_cwe", "ruler_fwe",
           "ruler_niah", "ruler_qa", "ruler_suite", "ruler_vt"]
