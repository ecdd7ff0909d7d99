"""Costs of one prefill + greedy decode on random token ids: KV bytes, TTFT, decode tokens/s and peak memory.

A measurement-only task (no quality metric), for any model including tokenizer-free tiny test models: the prompt
is ``length`` random token ids (seeded), split into a context (compressed) and a 16-token question, decoded for
``new_tokens`` tokens with no stop token, through :func:`lmcompress.eval.pipeline.answer`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..._compat import text_config
from ...errors import LMCompressError, check_choice, check_positive_int
from ...registry import TASKS
from ..pipeline import DECODE_MODES, answer
from .base import RunContext, Task, TaskResult

QUESTION_TOKENS = 16


@TASKS.register("decode_cost")
@dataclass(frozen=True)
class DecodeCost(Task):
    """Attributes:
    length: prompt tokens (context + a 16-token question), > 16.
    new_tokens: tokens decoded (no EOS stops it).
    seed: seed of the random prompt ids.
    decode: ``auto``, ``eager`` or ``static`` (see :func:`lmcompress.eval.pipeline.answer`).
    """

    name = "decode_cost"
    primary_metric = "decode_tok_s"

    length: int = 512
    new_tokens: int = 16
    seed: int = 0
    decode: str = "auto"

    def __post_init__(self) -> None:
        check_positive_int("length", self.length)
        if self.length <= QUESTION_TOKENS:
            raise LMCompressError(f"length={self.length} leaves no context before the {QUESTION_TOKENS}-token "
                                  f"question; allowed: > {QUESTION_TOKENS}")
        check_positive_int("new_tokens", self.new_tokens)
        check_choice("decode", self.decode, DECODE_MODES)

    def run(self, ctx: RunContext) -> TaskResult:
        vocab = int(text_config(ctx.model.config).vocab_size)
        ids = torch.randint(0, vocab, (1, self.length), generator=torch.Generator().manual_seed(self.seed))
        gen = answer(ctx.model, ids[:, :-QUESTION_TOKENS], ids[:, -QUESTION_TOKENS:], ctx.spec,
                     max_new_tokens=self.new_tokens, eos_token_ids=[], decode=self.decode)
        return TaskResult(
            metrics={"decode_tok_s": gen.decode_tok_s},
            costs={"prompt_tokens": gen.prompt_tokens, "kv_bytes": gen.kv_bytes, "kv_bytes_end": gen.kv_bytes_end,
                   "ttft_s": gen.ttft_s, "decode_tok_s": gen.decode_tok_s, "peak_mem_bytes": gen.peak_mem_bytes,
                   "mem_source": gen.mem_source},
            details={"held_tokens": gen.held_tokens, "token_ids": gen.token_ids},
        )
