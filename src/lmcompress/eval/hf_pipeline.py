"""The context pipeline as a transformers pipeline task, for code written against kvpress.

kvpress::

    import kvpress  # registers "kv-press-text-generation"
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer)
    pipe(context, question=question, press=SnapKVPress(compression_ratio=0.5))["answer"]

lmcompress (registration is an explicit call, since importing lmcompress changes nothing)::

    lmcompress.register_pipeline()  # registers "lmcompress-text-generation"
    pipe = pipeline("lmcompress-text-generation", model=model, tokenizer=tokenizer)
    pipe(context, question=question, spec=KVSpec(evict=SnapKV(ratio=0.5)))["answer"]

``questions=[...]`` returns ``{"answers": [...]}``; ``answer_prefix``, ``max_new_tokens`` and ``query_aware``
are passed through to :class:`~lmcompress.eval.context_pipeline.ContextPipeline`. ``press=`` is accepted as a
synonym of ``spec=`` (it must be a ``KVSpec``; a kvpress press is refused with a clear error).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from .. import _compat
from ..errors import LMCompressError
from ..kv.spec import KVSpec

TASK_NAME = "lmcompress-text-generation"


@lru_cache(maxsize=1)
def pipeline_class() -> type:
    """The ``transformers.Pipeline`` subclass (built on first use, so importing this module loads nothing)."""
    base = _compat.pipeline_base_class()

    class LMCompressTextGenerationPipeline(base):
        """Context + question(s) -> answer(s) with a compressed KV cache (see lmcompress.eval.hf_pipeline)."""

        def _sanitize_parameters(self, question=None, questions=None, answer_prefix="", spec=None, press=None,
                                 max_new_tokens=32, query_aware=False, decode="auto", **kwargs):
            if kwargs:
                raise LMCompressError(
                    f"unknown argument(s) {', '.join(sorted(kwargs))}; allowed: question, questions, "
                    "answer_prefix, spec (or press), max_new_tokens, query_aware, decode")
            if spec is not None and press is not None:
                raise LMCompressError("give spec= or press=, not both")
            spec = spec if spec is not None else press
            if spec is not None and not isinstance(spec, KVSpec):
                raise LMCompressError(f"spec={spec!r} is not an lmcompress KVSpec; allowed: KVSpec(evict=..., "
                                      "quant=...) or lmcompress.kv.parse.parse_method('snapkv:ratio=0.5')")
            forward = {"question": question, "questions": questions, "answer_prefix": answer_prefix,
                       "spec": spec, "max_new_tokens": max_new_tokens, "query_aware": query_aware,
                       "decode": decode}
            return {}, forward, {}

        def preprocess(self, context, **_: Any):
            return {"context": context}

        def _forward(self, model_inputs, question=None, questions=None, answer_prefix="", spec=None,
                     max_new_tokens=32, query_aware=False, decode="auto"):
            from .context_pipeline import pipeline

            pipe = pipeline(self.model, self.tokenizer, spec or KVSpec(), decode=decode)
            return pipe(model_inputs["context"], question=question, questions=questions,
                        max_new_tokens=max_new_tokens, answer_prefix=answer_prefix, query_aware=query_aware)

        def postprocess(self, model_outputs, **_: Any):
            return model_outputs

    return LMCompressTextGenerationPipeline


def register_pipeline() -> str:
    """Register the ``lmcompress-text-generation`` pipeline task with transformers; returns the task name."""
    _compat.register_pipeline_task(TASK_NAME, pipeline_class())
    return TASK_NAME
