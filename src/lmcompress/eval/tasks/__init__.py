"""Evaluation tasks, registered by name in ``TASKS``."""

from . import kv_error, multiple_choice

__all__ = ["kv_error", "multiple_choice"]
