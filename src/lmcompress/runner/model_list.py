"""Several models in one bench run or grid (the kvcompress suite's report: vanilla, vanilla + presses and a DMS
model on the same tasks, in one table).

``--model`` takes a comma-separated list (and may be repeated). KV specs pair with models by one rule, so that
the learned mechanism runs only where it exists:

* a DMS checkpoint (a folder whose ``config.json`` has ``dms_*`` keys, :mod:`lmcompress.kv.evict.dms_config`)
  runs ``none`` (its bytes are the uncompressed baseline of its own row group) and the specs that use ``dms``
  (``dms``, ``dms+kivi2`` ...); when no spec uses ``dms`` it runs every spec;
* any other model runs every spec that does not use ``dms``.

A ``dms`` spec with no DMS checkpoint in the list is an error, as is a model that would run nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..errors import LMCompressError
from ..kv.spec import KVSpec


def split_models(values: str | Iterable[str] | None, default: str) -> list[str]:
    """The model names of one or several ``--model`` values, each a comma-separated list (``default`` when
    none is given); duplicates are an error.

    Raises:
        LMCompressError: an empty list or a model named twice.
    """
    if values is None:
        values = [default]
    elif isinstance(values, str):
        values = [values]
    models = [m.strip() for v in values for m in v.split(",") if m.strip()]
    if not models:
        raise LMCompressError("--model is empty; give at least one model name or path")
    seen: set[str] = set()
    for m in models:
        if m in seen:
            raise LMCompressError(f"--model lists {m!r} twice; allowed: each model once")
        seen.add(m)
    return models


def is_dms_checkpoint(name: str) -> bool:
    """Whether ``name`` is a folder whose ``config.json`` has ``dms_*`` keys; such a folder's settings are
    validated here.

    Raises:
        LMCompressError: the folder has ``dms_*`` keys but lacks a required one or has an impossible value.
    """
    from ..kv.evict.dms_config import read_settings

    path = Path(name).expanduser() / "config.json"
    if not path.is_file():
        return False
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return False  # the model loader reports an unreadable config
    if not isinstance(config, dict) or not any(str(k).startswith("dms_") for k in config):
        return False
    try:
        read_settings(path.parent)
    except LMCompressError as exc:
        raise LMCompressError(f"model {name!r}: {exc}") from None
    return True


def uses_dms(spec: KVSpec) -> bool:
    """Whether the spec's eviction is DMS (directly or as a wrapper's ``base``)."""
    policy = spec.evict
    while policy is not None:
        if getattr(policy, "name", None) == "dms":
            return True
        policy = getattr(policy, "base", None)
    return False


def pair_specs(models: Sequence[str], specs: Sequence[KVSpec]) -> list[tuple[str, KVSpec]]:
    """``(model, spec)`` cells by the module's rule, model-major, specs in their order.

    Raises:
        LMCompressError: a ``dms`` spec and no DMS checkpoint among ``models``, or a model left with no spec.
    """
    dms = {m: is_dms_checkpoint(m) for m in models}
    any_dms_spec = any(uses_dms(s) for s in specs)
    if any_dms_spec and not any(dms.values()):
        raise LMCompressError(f"the methods include dms but no model of {', '.join(models)} is a DMS checkpoint "
                              "(a folder whose config.json has dms_* keys: `lmcompress dms retrofit`)")
    cells = []
    for m in models:
        if dms[m] and any_dms_spec:
            mine = [s for s in specs if uses_dms(s) or s.is_identity]
        elif dms[m]:
            mine = list(specs)
        else:
            mine = [s for s in specs if not uses_dms(s)]
        if not mine:
            raise LMCompressError(f"model {m!r} would run no method: the methods are all dms and {m!r} is not a "
                                  "DMS checkpoint; add a method for it (e.g. none) or drop it")
        cells += [(m, s) for s in mine]
    return cells
