"""RULER's variable tracking (``vt``): chains of ``VAR X = 12345`` / ``VAR Y = VAR X`` assignments hidden in
noise lines; the model must list every variable that ends up holding the chain's value.

As in NVIDIA/RULER (``variable_tracking.py`` with ``num_chains=1``, ``num_hops=4``, noise haystack): 5-letter
upper-case names, a 5-digit value, each chain's lines in order at random line positions, and one solved
in-context example in front (3-letter names, a short noise haystack; RULER sizes it to 500 tokens, here it has
``icl_noise_lines`` noise lines, about 500 tokens for a BPE tokenizer). Score: ``string_match_all`` over the
chain's variables (the first chain's, when there are several), 0..100.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

from ...errors import check_positive_int
from ...registry import TASKS
from .ruler_base import RulerSample, RulerTask
from .ruler_data import NOISE

HEAD = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
QUESTION = "\nQuestion: Find all variables that are assigned the value {query} in the text above."
ANSWER_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables "
                 "are assigned the value {query}, they are: ")


def chains(rng: random.Random, num_chains: int, num_hops: int, name_len: int) -> tuple[list[list[str]], list[list[str]]]:
    """``(variables, lines)`` per chain: ``num_hops + 1`` distinct names, and the assignment lines."""
    names: list[str] = []
    while len(names) < num_chains * (num_hops + 1):
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(name_len))
        if name not in names:
            names.append(name)
    variables, lines = [], []
    for c in range(num_chains):
        vs = names[c * (num_hops + 1) : (c + 1) * (num_hops + 1)]
        chain = [f"VAR {vs[0]} = {rng.randint(10000, 99999)}"]
        chain += [f"VAR {vs[j + 1]} = VAR {vs[j]} " for j in range(num_hops)]
        variables.append(vs)
        lines.append(chain)
    return variables, lines


def vt_text(rng: random.Random, n_noise: int, num_chains: int, num_hops: int, name_len: int) -> tuple[str, str, list[str]]:
    """``(context, value, answer variables)`` of one variable-tracking haystack of ``n_noise`` noise lines."""
    variables, lines = chains(rng, num_chains, num_hops, name_len)
    value = lines[0][0].split("=")[-1].strip()
    sentences = [NOISE] * max(n_noise, num_hops + 1)  # room for every line of a chain
    for chain in lines:
        positions = sorted(rng.sample(range(len(sentences)), len(chain)))
        for j, (pos, line) in enumerate(zip(positions, chain)):
            sentences.insert(pos + j, line)
    return "\n".join(sentences).replace(". \n", ".\n"), value, variables[0]


@TASKS.register("vt")
@dataclass(frozen=True)
class VariableTracking(RulerTask):
    """RULER variable tracking (see the module docstring).

    Attributes:
        num_chains: assignment chains (the first is asked for).
        num_hops: assignments after the first in each chain.
        few_shot: put RULER's one solved example in front.
        icl_noise_lines: noise lines of that example.
    """

    name = "vt"
    max_new_tokens: int = 30

    num_chains: int = 1
    num_hops: int = 4
    few_shot: bool = True
    icl_noise_lines: int = 18

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int("num_chains", self.num_chains)
        check_positive_int("num_hops", self.num_hops)
        check_positive_int("icl_noise_lines", self.icl_noise_lines)

    def size_hint(self) -> int:
        return 10

    def make_sample(self, rng: random.Random, size: int) -> RulerSample:
        head = HEAD
        if self.few_shot:
            hops = min(10, self.num_hops)
            ctx, value, outputs = vt_text(rng, self.icl_noise_lines, self.num_chains, hops, 3)
            example = (HEAD + ctx + QUESTION.format(query=value)
                       + ANSWER_PREFIX.format(num_v=hops + 1, query=value) + " " + " ".join(outputs) + "\n")
            head = example + "\n" + HEAD
        context, value, outputs = vt_text(rng, size, self.num_chains, self.num_hops, 5)
        return RulerSample(
            context=head + context,
            question=QUESTION.format(query=value),
            answer_prefix=ANSWER_PREFIX.format(num_v=self.num_hops + 1, query=value),
            outputs=outputs,
        )
