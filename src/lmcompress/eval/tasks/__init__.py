"""Evaluation tasks (one file each, registered by name in ``TASKS``)."""

from . import (
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
from .kv_error import KVError
from .multiple_choice import MultipleChoice
from .passkey import Passkey
from .perplexity import Perplexity

__all__ = ["KVError", "MultipleChoice", "Passkey", "Perplexity", "RunContext", "Task", "TaskResult", "kv_error",
           "longbench", "multiple_choice", "needle_grid", "ruler_cwe", "ruler_fwe", "ruler_niah", "ruler_qa",
           "ruler_suite", "ruler_vt"]
