"""Multiple-choice accuracy by log-likelihood, with the question's KV cache compressed.

Each question is prefilled into a :class:`~lmcompress.kv.cache.CompressedCache` (the spec under test compresses
it); each choice is then scored by the summed log-probability of its tokens given the compressed question (and
the choice's own earlier tokens). The predicted choice has the highest sum (``accuracy``) or the highest mean
per token (``accuracy_mean``, QAQ's normalization). The question is compressed once and each choice is fed on
its own copy of the compressed cache.

Questions come from BIG-bench JSON tasks read straight from the ``bigbench==1.0.0`` source distribution
(``pip download --no-deps bigbench==1.0.0 -d DIR``; 358 MB, never imported). Prompt: ``"Question: <input>\\n
Answer:"``, each choice scored as ``" " + choice`` (lm-eval's format). With full precision SmolLM2-135M scores
45.7% on general_knowledge (70 questions, chance 1/6-1/7) and 28% on the first 100 of date_understanding (chance
17%); BIG-bench's own prefixes (``"\\nQ: "``, choices listed, ``"\\nA:"``) gave 35.7% and 27%.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..._compat import cache_kwargs
from ...errors import LMCompressError, ModelFileError, check_positive_int
from ...kv.cache import CompressedCache
from ...kv.hooks import scoring_hooks
from ...kv.spec import KVSpec
from ...registry import TASKS
from ..kv_bytes import bf16_equivalent_bytes, uncompressed_bf16_bytes
from .base import RunContext, Task, TaskResult

SDIST = "bigbench-1.0.0.tar.gz"


def bigbench_dir() -> Path:
    return Path(os.environ.get("LMCOMPRESS_BIGBENCH", Path.home() / ".cache" / "lmcompress" / "bigbench"))


@functools.cache
def bigbench_task(name: str, folder: str | None = None) -> dict:
    """The JSON of BIG-bench task ``name`` from the sdist in ``folder`` (default :func:`bigbench_dir`)."""
    path = Path(folder) if folder else bigbench_dir()
    sdist = path / SDIST
    if not sdist.is_file():
        raise ModelFileError(
            f"BIG-bench tasks need {sdist}; download it with "
            f"`pip download --no-deps bigbench==1.0.0 -d {path}` (or set LMCOMPRESS_BIGBENCH)"
        )
    member = f"bigbench-1.0.0/bigbench/benchmark_tasks/{name}/task.json"
    with tarfile.open(sdist) as tar:
        try:
            return json.load(tar.extractfile(member))
        except KeyError:
            raise LMCompressError(f"BIG-bench has no JSON task {name!r}") from None


@dataclass(frozen=True)
class Question:
    prompt: str
    choices: tuple[str, ...]
    answer: int


def _gold(scores: dict) -> str:
    return max(scores, key=scores.get)


def bigbench_questions(name: str, limit: int | None = None, folder: str | None = None, shots: int = 0
                       ) -> list[Question]:
    """The first ``limit`` multiple-choice questions of a BIG-bench JSON task as ``"Question: <input>\\nAnswer:"``
    prompts (choices are scored as continuations, not listed in the prompt).

    ``shots > 0`` prepends the task's first ``shots`` scored examples, each as ``"Question: <input>\\nAnswer:
    <gold choice>\\n\\n"`` (lm-eval's few-shot layout), to every prompt; those examples are not asked, the
    questions start after them. Long few-shot prompts are what lets a KV method reach high compression on
    short questions (QAQ's multiple-choice claim).
    """
    check_positive_int("shots", shots, allow_zero=True)
    task = bigbench_task(name, folder)
    prefix = task.get("task_prefix", "")
    examples = task["examples"]
    scored = [i for i, ex in enumerate(examples) if ex.get("target_scores")]
    if shots and shots >= len(scored):
        raise LMCompressError(f"shots={shots} leaves no question of BIG-bench {name!r} ({len(scored)} scored "
                              f"examples); allowed: 0 <= shots < {len(scored)}")
    demo = "".join(f"Question: {examples[i]['input'].strip()}\nAnswer: {_gold(examples[i]['target_scores'])}\n\n"
                   for i in scored[:shots])
    start = scored[shots - 1] + 1 if shots else 0
    questions = []
    for ex in examples[start:][:limit]:
        scores = ex.get("target_scores")
        if not scores:
            continue
        choices = tuple(scores)
        answer = max(range(len(choices)), key=lambda i: scores[choices[i]])
        prompt = f"{prefix}{demo}Question: {ex['input'].strip()}\nAnswer:"
        questions.append(Question(prompt=prompt, choices=choices, answer=answer))
    return questions


def new_compressed_cache(spec: KVSpec):
    """A cache factory for :func:`choice_log_likelihoods`: ``model -> CompressedCache(model, spec)``."""
    return lambda model: CompressedCache(model, spec)


def cache_bytes(cache) -> tuple[int, int]:
    """``(bytes held, bytes as a bf16 model holds them)`` of a :class:`CompressedCache`."""
    return cache.nbytes, bf16_equivalent_bytes(cache.tensors())


@torch.no_grad()
def choice_log_likelihoods(
    model: torch.nn.Module, make_cache, prompt_ids: torch.Tensor, choice_ids: list[list[int]],
    measure=cache_bytes,
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """Summed and mean log-probabilities ``[n]`` of each choice's tokens after the compressed prompt.

    The prompt is prefilled and compressed once; each choice is scored on its own copy of that cache.

    Args:
        make_cache: ``model -> cache`` (a :class:`CompressedCache` or any transformers cache).
        prompt_ids: ``[1, P]``.
        choice_ids: token ids of each choice (continuing the prompt).
        measure: ``cache -> (bytes held, bf16-equivalent bytes)``.

    Returns:
        ``(sums, means, bytes)``, the bytes being those of the compressed prompt's cache.
    """
    cache = make_cache(model)
    compressed = isinstance(cache, CompressedCache)
    with scoring_hooks(model, cache) if compressed else contextlib.nullcontext():
        last = model(prompt_ids, **cache_kwargs(cache), logits_to_keep=1).logits[0, -1].float()
    prompt_bytes = measure(cache)
    first = F.log_softmax(last, -1)
    sums, means = [], []
    for choice in choice_ids:
        total = float(first[choice[0]])
        if len(choice) > 1:
            branch = copy.deepcopy(cache)
            with branch.compression_paused() if compressed else contextlib.nullcontext():
                ids = torch.tensor([choice[:-1]], device=prompt_ids.device)
                logits = model(ids, **cache_kwargs(branch)).logits[0].float()
            target = torch.tensor(choice[1:], device=logits.device).unsqueeze(1)
            total += float(F.log_softmax(logits, -1).gather(1, target).sum())
        sums.append(total)
        means.append(total / len(choice))
    return torch.tensor(sums), torch.tensor(means), prompt_bytes


def encode_choices(tokenizer, prompt: str, choices: tuple[str, ...]) -> tuple[torch.Tensor, list[list[int]]]:
    """Prompt ids and each choice's ids: the prompt without trailing spaces, each choice after one space (how
    the tokenizer splits running text, e.g. ``"A:"`` + ``" four"``)."""
    prompt = prompt.rstrip()
    prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids
    return prompt_ids, [tokenizer(" " + c.strip(), add_special_tokens=False).input_ids for c in choices]


def evaluate(model: torch.nn.Module, tokenizer, questions: list[Question], make_cache,
             measure=cache_bytes) -> dict:
    """Accuracy (summed and mean log-likelihood) and prompt KV bytes over ``questions``."""
    correct = correct_mean = 0
    held = bf16 = ref = tokens = 0
    device = next(model.parameters()).device
    for q in questions:
        prompt_ids, choice_ids = encode_choices(tokenizer, q.prompt, q.choices)
        sums, means, (b_held, b_bf16) = choice_log_likelihoods(
            model, make_cache, prompt_ids.to(device), choice_ids, measure)
        correct += int(int(sums.argmax()) == q.answer)
        correct_mean += int(int(means.argmax()) == q.answer)
        held, bf16 = held + b_held, bf16 + b_bf16
        ref += uncompressed_bf16_bytes(model, prompt_ids.shape[1])
        tokens += prompt_ids.shape[1]
    n = len(questions)
    return {"accuracy": correct / n, "accuracy_mean": correct_mean / n, "questions": n,
            "prompt_tokens": tokens / n, "kv_bytes": held / n, "kv_bytes_bf16": bf16 / n, "ratio_bf16": ref / bf16}


@TASKS.register("multiple_choice")
@dataclass(frozen=True)
class MultipleChoice(Task):
    """Zero- or few-shot multiple-choice accuracy on a BIG-bench JSON task with the question's KV compressed.

    Attributes:
        task: BIG-bench task name (``general_knowledge``, ``date_understanding``, ...).
        limit: the first ``limit`` questions (None: all).
        shots: solved examples prepended to every prompt (the task's first ones, then not asked; default 0).
    """

    name = "multiple_choice"
    primary_metric = "accuracy"

    task: str = "general_knowledge"
    limit: int | None = None
    shots: int = 0

    def __post_init__(self) -> None:
        if self.limit is not None:
            check_positive_int("limit", self.limit)
        check_positive_int("shots", self.shots, allow_zero=True)

    def run(self, ctx: RunContext) -> TaskResult:
        if ctx.tokenizer is None:
            raise LMCompressError("the multiple_choice task needs a model with a tokenizer")
        res = evaluate(ctx.model, ctx.tokenizer, bigbench_questions(self.task, self.limit, shots=self.shots),
                       new_compressed_cache(ctx.spec))
        metrics = {k: res[k] for k in ("accuracy", "accuracy_mean")}
        costs = {k: res[k] for k in ("questions", "prompt_tokens", "kv_bytes", "kv_bytes_bf16", "ratio_bf16")}
        return TaskResult(metrics=metrics, costs=costs)
