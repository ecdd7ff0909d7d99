"""Quality of KV-cache quantization on the default model (CPU): perplexity, multiple choice, pass-key retrieval
and QAQ's error metrics, for every method against bits, with the compression ratio measured from the bytes the
cache holds (metadata included), next to transformers' QuantizedCache (quanto / HQQ backends) as the peer.

Subcommands (each appends one JSON line per configuration to ``--out`` and skips configurations already there,
so a killed run resumes):

* ``ppl``: perplexity of ``--tokens`` tokens of the Lee corpus, fed in chunks of ``--chunk`` tokens so that each
  chunk attends to the compressed cache of the earlier ones; scored on the predictions made after the first
  chunk;
* ``mc``: BIG-bench multiple choice (``--task``), the question's KV compressed (needs the bigbench sdist, see
  ``lmcompress.eval.tasks.multiple_choice``);
* ``needle``: pass-key retrieval: a ``--tokens``-token filler with a 5-digit key at several depths is prefilled
  and compressed, then the question is asked and 12 tokens are generated greedily;
* ``kverr``: QAQ's evaluator metrics (``lmcompress.eval.tasks.kv_error``);
* ``table``: print markdown tables of the JSON lines.

Compression ratio: bytes of an uncompressed bf16 cache of the same tokens / bytes held by the compressed cache
with its full-precision tensors counted at 2 bytes per element (the CPU model runs in fp32; a bf16 model would
hold those tensors in bf16). Packed codes, fp16 scales and integer tensors count as they are.

Usage (from the repository root)::

    PYTHONPATH=src python benchmarks/cpu_kv_quant.py ppl --out results/quant_ppl.jsonl
    PYTHONPATH=src python benchmarks/cpu_kv_quant.py table results/quant_ppl.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lmcompress.errors import LMCompressError  # noqa: E402
from lmcompress.eval.tasks.kv_error import (  # noqa: E402
    KVErrorTask,
    bf16_equivalent_bytes,
    uncompressed_bf16_bytes,
)
from lmcompress.kv import CompressedCache, KVSpec, SnapKV, scoring_hooks  # noqa: E402
from lmcompress.kv.quant import FP8KV, KIVI, QAQ, NormalKV, UniformKV  # noqa: E402


# --------------------------------------------------------------------------------------------- configurations
@dataclass(frozen=True)
class Peer:
    """transformers' QuantizedCache with an installed backend (quanto or hqq), its defaults otherwise."""

    backend: str
    bits: int
    group: int = 64
    residual: int = 128

    def label(self) -> str:
        return f"hf-{self.backend}-{self.bits}"

    def make(self, model):
        from transformers import QuantizedCache

        return QuantizedCache(self.backend, model.config, nbits=self.bits, q_group_size=self.group,
                              residual_length=self.residual)


def grid(name: str) -> dict[str, object]:
    """label -> KVSpec or Peer."""
    g: dict[str, object] = {"fp": KVSpec()}
    bits = (8, 4, 3, 2)
    for b in bits:
        g[f"uniform-{b}"] = KVSpec(quant=UniformKV(key_bits=b, value_bits=b, group_size=32))
    for b in (3, 2):
        g[f"uniform-{b}+out1%"] = KVSpec(quant=UniformKV(key_bits=b, value_bits=b, group_size=32, outliers=0.01))
    for b in bits:
        g[f"normal-{b}"] = KVSpec(quant=NormalKV(key_bits=b, value_bits=b))
    g["fp8"] = KVSpec(quant=FP8KV())
    for b in bits:
        g[f"kivi-{b}"] = KVSpec(quant=KIVI(bits=b))
    for label, q in qaq_grid().items():
        g[label] = KVSpec(quant=q)
    if name in ("needle", "kverr"):  # eviction of one long prefill (chunked perplexity would evict every chunk)
        g["snapkv0.75"] = KVSpec(evict=SnapKV(ratio=0.75))
        g["snapkv0.75+kivi-2"] = KVSpec(evict=SnapKV(ratio=0.75), quant=KIVI(bits=2))
        g["snapkv0.75+qaq-0.003/0.03"] = KVSpec(evict=SnapKV(ratio=0.75), quant=qaq_grid()["qaq-0.003/0.03"])
    for backend in ("quanto", "hqq"):
        for b in (4, 2):
            g[Peer(backend, b).label()] = Peer(backend, b)
    if name == "mc":  # short prompts: KIVI's window would hold them whole; a 32-token window quantizes them
        for b in (4, 2):
            g[f"kivi-{b}-R32"] = KVSpec(quant=KIVI(bits=b, residual=32))
    return g


def qaq_grid() -> dict[str, QAQ]:
    """QAQ at a few error targets (labels give sigma_S / sigma_X), per-layer scales, min 1 bit."""
    out = {}
    for ke, ve in ((1e-3, 1e-2), (3e-3, 3e-2), (1e-2, 0.1), (3e-2, 0.3), (0.3, 1.0)):
        out[f"qaq-{ke:g}/{ve:g}"] = QAQ(key_error=ke, value_error=ve, min_bits=1, granularity="layer")
    out["qaq-0.003/0.03-head"] = QAQ(key_error=3e-3, value_error=3e-2, min_bits=1, granularity="head")
    out["qaq-0.003/0.03-max4"] = QAQ(key_error=3e-3, value_error=3e-2, min_bits=1, max_bits=4, granularity="layer")
    out["qaq-0.003/0.03-noout"] = QAQ(key_error=3e-3, value_error=3e-2, min_bits=1, granularity="layer",
                                      outliers=0.0)
    return out


# --------------------------------------------------------------------------------------------- caches
def make_cache(model, config):
    return config.make(model) if isinstance(config, Peer) else CompressedCache(model, config)


def flat_tensors(x) -> list[torch.Tensor]:
    """The plain tensors inside a (possibly subclassed, e.g. quanto) tensor."""
    if isinstance(x, (tuple, list)):
        return [t for item in x for t in flat_tensors(item)]
    if isinstance(x, dict):
        return [t for item in x.values() for t in flat_tensors(item)]
    if not isinstance(x, torch.Tensor):
        return []
    flatten = getattr(x, "__tensor_flatten__", None)
    if flatten is not None and type(x) is not torch.Tensor:
        names, _ = flatten()
        return [t for n in names for t in flat_tensors(getattr(x, n))]
    return [x]


def cache_bytes(cache) -> tuple[int, int]:
    """(bytes held, bytes with fp32 tensors counted at 2 bytes/element)."""
    if isinstance(cache, CompressedCache):
        return cache.nbytes, bf16_equivalent_bytes(cache)
    tensors = []
    for layer in cache.layers:
        tensors += flat_tensors([layer.keys, layer.values, layer._quantized_keys, layer._quantized_values])
    held = sum(t.numel() * t.element_size() for t in tensors)
    bf16 = sum(t.numel() * (2 if t.dtype == torch.float32 else t.element_size()) for t in tensors)
    return held, bf16


# --------------------------------------------------------------------------------------------- tasks
def text_ids(tok, tokens: int) -> torch.Tensor:
    from lmcompress.eval.text import english_text

    return tok(english_text("lee"), return_tensors="pt").input_ids[:, :tokens]


@torch.no_grad()
def perplexity(model, tok, config, tokens: int, chunk: int) -> dict:
    ids = text_ids(tok, tokens)
    n = ids.shape[1]
    cache = make_cache(model, config)
    nll, count = 0.0, 0
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        with scoring_hooks(model, cache) if isinstance(cache, CompressedCache) else _null():
            logits = model(ids[:, s:e], past_key_values=cache).logits[0].float()
        if s == 0:
            continue
        targets = ids[0, s + 1 : e + 1]
        lp = F.log_softmax(logits[: targets.shape[0]], -1)
        nll -= float(lp.gather(1, targets.unsqueeze(1)).sum())
        count += targets.shape[0]
    held, bf16 = cache_bytes(cache)
    return {"ppl": math.exp(nll / count), "scored": count, "bytes": held, "bytes_bf16": bf16,
            "ratio": uncompressed_bf16_bytes(model, n) / bf16}


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


@torch.no_grad()
def multiple_choice(model, tok, config, task: str, limit: int | None) -> dict:
    from lmcompress.eval.tasks.multiple_choice import bigbench_questions, encode_choices

    correct = correct_mean = 0
    bytes_ref = bytes_bf16 = 0
    questions = bigbench_questions(task, limit)
    for q in questions:
        prompt_ids, choice_ids = encode_choices(tok, q.prompt, q.choices)
        cache = make_cache(model, config)
        last = model(prompt_ids, past_key_values=cache, logits_to_keep=1).logits[0, -1].float()
        bytes_bf16 += cache_bytes(cache)[1]
        bytes_ref += uncompressed_bf16_bytes(model, prompt_ids.shape[1])
        first = F.log_softmax(last, -1)
        sums, means = [], []
        for choice in choice_ids:
            total = float(first[choice[0]])
            if len(choice) > 1:
                branch = copy.deepcopy(cache)
                logits = model(torch.tensor([choice[:-1]]), past_key_values=branch).logits[0].float()
                total += float(F.log_softmax(logits, -1).gather(1, torch.tensor(choice[1:]).unsqueeze(1)).sum())
            sums.append(total)
            means.append(total / len(choice))
        correct += int(max(range(len(sums)), key=sums.__getitem__) == q.answer)
        correct_mean += int(max(range(len(means)), key=means.__getitem__) == q.answer)
    n = len(questions)
    return {"accuracy": correct / n, "accuracy_mean": correct_mean / n, "questions": n,
            "ratio": bytes_ref / bytes_bf16, "bytes_bf16": bytes_bf16 / n}


def passkey_prompt(tok, tokens: int, depth: float, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(context ids, question ids): repeated filler with the key stated twice at ``depth``; the chat-template
    question asks for the number only."""
    filler = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    unit = tok(filler, add_special_tokens=False).input_ids
    reps = max(1, tokens // len(unit))
    pos = int(reps * depth)
    text = "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    text += filler * pos + needle + filler * (reps - pos)
    messages = [{"role": "user", "content": text + "\nWhat is the pass key? Reply with the number only."}]
    full = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    split = full.index("\nWhat is the pass key?")
    context = tok(full[:split], return_tensors="pt", add_special_tokens=False).input_ids
    question = tok(full[split:], return_tensors="pt", add_special_tokens=False).input_ids
    return context, question


@torch.no_grad()
def needle(model, tok, config, tokens: int, trials: int) -> dict:
    depths = (0.1, 0.5, 0.9)
    found = 0
    ratio_num = ratio_den = 0
    for i in range(trials):
        key = 10000 + (7919 * (i + 1)) % 90000
        context, question = passkey_prompt(tok, tokens, depths[i % len(depths)], key)
        cache = make_cache(model, config)
        with scoring_hooks(model, cache) if isinstance(cache, CompressedCache) else _null():
            model(context, past_key_values=cache)
        ratio_num += uncompressed_bf16_bytes(model, context.shape[1])
        ratio_den += cache_bytes(cache)[1]
        paused = cache.compression_paused() if isinstance(cache, CompressedCache) else _null()
        with paused:
            logits = model(question, past_key_values=cache).logits[0, -1]
        out = []
        tok_id = int(logits.argmax())
        for _ in range(12):  # the key's digits are single tokens after "The pass key is"
            out.append(tok_id)
            logits = model(torch.tensor([[tok_id]]), past_key_values=cache).logits[0, -1]
            tok_id = int(logits.argmax())
        found += int(str(key) in tok.decode(out))
    return {"found": found, "trials": trials, "accuracy": found / trials, "ratio": ratio_num / ratio_den}


# --------------------------------------------------------------------------------------------- driver
def done_labels(path: Path, extra: dict) -> set[str]:
    if not path.exists():
        return set()
    out = set()
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if all(rec.get(k) == v for k, v in extra.items()):
            out.add(rec["label"])
    return out


def run(args) -> None:
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    from lmcompress.models import load_model

    model, tok = load_model("smollm2-135m")
    configs = grid(args.cmd)
    if args.only:
        configs = {k: v for k, v in configs.items() if any(k.startswith(p) for p in args.only)}
    extra = {"cmd": args.cmd, **{k: getattr(args, k) for k in ("tokens", "chunk", "task", "limit", "trials")
                                 if getattr(args, k, None) is not None}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    skip = done_labels(args.out, extra)
    for label, config in configs.items():
        if label in skip:
            continue
        t0 = time.time()
        try:
            if args.cmd == "ppl":
                res = perplexity(model, tok, config, args.tokens, args.chunk)
            elif args.cmd == "mc":
                res = multiple_choice(model, tok, config, args.task, args.limit)
            elif args.cmd == "needle":
                res = needle(model, tok, config, args.tokens, args.trials)
            else:
                if isinstance(config, Peer):
                    continue
                res = KVErrorTask(samples=args.trials, context_tokens=args.tokens,
                                  continuation_tokens=args.chunk).run(model, tok, config)
                res.pop("layers")
        except (ImportError, LMCompressError) as exc:  # a peer backend not installed; a spec that does not fit
            res = {"error": str(exc).splitlines()[0]}
        rec = {"label": label, **extra, **res, "seconds": round(time.time() - t0, 1),
               "spec": None if isinstance(config, Peer) else config.to_dict(),
               "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
               "date": time.strftime("%Y-%m-%d")}
        with args.out.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps({k: v for k, v in rec.items() if k not in ("spec", "machine")}), flush=True)


def table(path: Path) -> None:
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    if not recs:
        return
    cols = [k for k in recs[0] if k not in ("spec", "machine", "date", "label", "cmd")]
    print("| label | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for r in recs:
        vals = []
        for c in cols:
            v = r.get(c, "")
            vals.append(f"{v:.4g}" if isinstance(v, float) else str(v))
        print(f"| {r['label']} | " + " | ".join(vals) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cmd", choices=["ppl", "mc", "needle", "kverr", "table"])
    parser.add_argument("path", nargs="?", type=Path, help="(table) the JSON-lines file")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--task", default="general_knowledge")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", nargs="*", help="labels starting with these prefixes")
    args = parser.parse_args()
    if args.cmd == "table":
        table(args.path)
        return
    if args.out is None:
        parser.error("--out is required")
    for name in ("chunk",) if args.cmd in ("mc", "needle") else ():
        setattr(args, name, None)
    if args.cmd != "mc":
        args.task = None
        args.limit = None
    if args.cmd in ("ppl", "mc"):
        args.trials = None
    run(args)


if __name__ == "__main__":
    main()
