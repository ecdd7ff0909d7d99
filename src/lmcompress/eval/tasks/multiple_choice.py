"""Multiple-choice accuracy by log-likelihood, with the question's KV cache compressed.

Each question is prefilled into a :class:`~lmcompress.kv.cache.CompressedCache` (the spec under test compresses
it); each choice is then scored by the summed log-probability of its tokens given the compressed question (and
the choice's own earlier tokens). The predicted choice has the highest sum (``accuracy``) or the highest mean
per token (``accuracy_mean``, QAQ's normalization). The question is compressed once and each choice is fed on
its own copy of the compressed cache.

Questions come from BIG-bench JSON tasks read straight from the ``bigbench==1.0.0`` source distribution
(``pip download --no-deps bigbench==1.0.0 -d DIR``; 358 MB, never imported): prompts follow BIG-bench's
defaults (``"\\nQ: " + input [+ "\\n  choice: ..." when the task lists its choices] + "\\nA: "``, then the choice
text).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ...errors import LMCompressError, ModelFileError, check_positive_int
from ...kv.cache import CompressedCache
from ...kv.hooks import scoring_hooks
from ...kv.spec import KVSpec
from ...registry import TASKS
from .kv_error import bf16_equivalent_bytes, uncompressed_bf16_bytes

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


def bigbench_questions(name: str, limit: int | None = None, folder: str | None = None) -> list[Question]:
    """The first ``limit`` multiple-choice questions of a BIG-bench JSON task, formatted with its prefixes."""
    task = bigbench_task(name, folder)
    inp = task.get("example_input_prefix", "\nQ: ")
    out = task.get("example_output_prefix", "\nA: ")
    choice_prefix = task.get("choice_prefix", "\n  choice: ")
    prefix = task.get("task_prefix", "")
    questions = []
    for ex in task["examples"][:limit]:
        scores = ex.get("target_scores")
        if not scores:
            continue
        choices = tuple(scores)
        text = ex["input"]
        if task.get("append_choices_to_input", True):
            text += choice_prefix + choice_prefix.join(choices)
        answer = max(range(len(choices)), key=lambda i: scores[choices[i]])
        questions.append(Question(prompt=prefix + inp + text + out, choices=choices, answer=answer))
    return questions


@torch.no_grad()
def choice_log_likelihoods(
    model: torch.nn.Module, spec: KVSpec, prompt_ids: torch.Tensor, choice_ids: list[list[int]]
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """Summed and mean log-probabilities ``[n]`` of each choice's tokens after the compressed prompt.

    The prompt is prefilled and compressed once; each choice is scored on its own copy of that cache.

    Args:
        prompt_ids: ``[1, P]``.
        choice_ids: token ids of each choice (continuing the prompt).

    Returns:
        ``(sums, means, (nbytes, nbytes_bf16))``, the bytes being those of the compressed prompt's cache.
    """
    cache = CompressedCache(model, spec)
    with scoring_hooks(model, cache):
        last = model(prompt_ids, past_key_values=cache, logits_to_keep=1).logits[0, -1].float()
    prompt_bytes = (cache.nbytes, bf16_equivalent_bytes(cache))
    first = F.log_softmax(last, -1)
    sums, means = [], []
    for choice in choice_ids:
        total = float(first[choice[0]])
        if len(choice) > 1:
            branch = copy.deepcopy(cache)
            with branch.compression_paused():
                logits = model(torch.tensor([choice[:-1]]), past_key_values=branch).logits[0].float()
            logp = F.log_softmax(logits, -1)
            total += float(logp.gather(1, torch.tensor(choice[1:]).unsqueeze(1)).sum())
        sums.append(total)
        means.append(total / len(choice))
    return torch.tensor(sums), torch.tensor(means), prompt_bytes


def encode_choices(tokenizer, prompt: str, choices: tuple[str, ...]) -> tuple[torch.Tensor, list[list[int]]]:
    """Prompt ids and each choice's ids as the tokenizer splits ``prompt + choice`` (the choice's tokens are
    those after the prompt's)."""
    prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids
    p = prompt_ids.shape[1]
    out = []
    for c in choices:
        full = tokenizer(prompt + c).input_ids
        if full[:p] != prompt_ids[0].tolist() or len(full) == p:
            full = prompt_ids[0].tolist() + tokenizer(c, add_special_tokens=False).input_ids
        out.append(full[p:])
    return prompt_ids, out


@TASKS.register("multiple_choice")
@dataclass(frozen=True)
class MultipleChoiceTask:
    """Zero-shot multiple-choice accuracy on a BIG-bench JSON task with the question's KV compressed.

    Attributes:
        task: BIG-bench task name (``general_knowledge``, ``date_understanding``, ...).
        limit: the first ``limit`` questions (None: all).
    """

    name = "multiple_choice"
    task: str = "general_knowledge"
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.limit is not None:
            check_positive_int("limit", self.limit)

    def run(self, model: torch.nn.Module, tokenizer, spec: KVSpec) -> dict:
        correct = correct_mean = 0
        bytes_, bytes_bf16, bytes_ref, tokens = 0, 0, 0, 0
        for q in bigbench_questions(self.task, self.limit):
            prompt_ids, choice_ids = encode_choices(tokenizer, q.prompt, q.choices)
            sums, means, (nbytes, nbytes_bf16) = choice_log_likelihoods(model, spec, prompt_ids, choice_ids)
            correct += int(int(sums.argmax()) == q.answer)
            correct_mean += int(int(means.argmax()) == q.answer)
            bytes_ += nbytes
            bytes_bf16 += nbytes_bf16
            bytes_ref += uncompressed_bf16_bytes(model, prompt_ids.shape[1])
            tokens += prompt_ids.shape[1]
        total = len(bigbench_questions(self.task, self.limit))
        return {
            "accuracy": correct / total,
            "accuracy_mean": correct_mean / total,
            "questions": total,
            "prompt_tokens": tokens / total,
            "kv_bytes": bytes_ / total,
            "kv_bytes_bf16": bytes_bf16 / total,
            "ratio_bf16": bytes_ref / bytes_bf16,
        }
