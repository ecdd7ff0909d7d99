"""Quality of KV-cache quantization on the default model (CPU): perplexity, multiple choice, pass-key retrieval
and QAQ's error metrics, for every method against bits, with the compression ratio measured from the bytes the
cache holds (metadata included), next to transformers' QuantizedCache (quanto / HQQ backends) as the peer.

Subcommands (each appends one JSON line per configuration to ``--out`` and skips configurations already there,
so a killed run resumes):

* ``ppl``: the ``perplexity`` task's protocol (``lmcompress.eval.tasks.perplexity``): ``--context`` tokens of the
  Lee corpus prefilled into the compressed cache, then ``--eval`` tokens scored in chunks of ``--chunk`` with
  eviction paused (every chunk attends to the compressed prefix; quantizers commit each chunk after it);
* ``mc``: BIG-bench multiple choice (``--task``), the question's KV compressed (``multiple_choice`` task; needs
  the bigbench sdist);
* ``needle``: the ``passkey`` task's prompts (synthetic filler, ``--tokens`` long, key at depths 0.1/0.5/0.9):
  the context is prefilled and compressed, the question appended, 10 tokens generated greedily;
* ``kverr``: QAQ's evaluator metrics (``kv_error`` task);
* ``table``: print markdown tables of the JSON lines.

The same protocol code runs the lmcompress specs and the transformers ``QuantizedCache`` peer (any cache
object), so the rows compare like with like.

Compression ratio: bytes of an uncompressed bf16 cache of the same tokens / bytes held by the compressed cache
with its full-precision tensors counted at 2 bytes per element (the CPU model runs in fp32; a bf16 model would
hold those tensors in bf16). Packed codes, fp16 scales and integer tensors count as they are.

Usage (from the repository root)::

    PYTHONPATH=src python benchmarks/cpu_kv_quant.py ppl --out results/quant_ppl.jsonl
    PYTHONPATH=src python benchmarks/cpu_kv_quant.py table results/quant_ppl.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lmcompress._compat import cache_kwargs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lmcompress.errors import LMCompressError  # noqa: E402
from lmcompress.eval.kv_bytes import bf16_equivalent_bytes, uncompressed_bf16_bytes  # noqa: E402
from lmcompress.eval.tasks import KVError, RunContext  # noqa: E402
from lmcompress.kv import CompressedCache, KVSpec, SnapKV, scoring_hooks  # noqa: E402
from lmcompress.kv.quant import FP8KV, KIVI, QAQ, IntKV, KVQuant, NormalKV, Rotated, TurboKV, UniformKV  # noqa: E402


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
    for b in (4, 3, 2):
        g[f"normal-{b}+out1%"] = KVSpec(quant=NormalKV(key_bits=b, value_bits=b, outliers=0.01))
    g["fp8"] = KVSpec(quant=FP8KV())
    for b in bits:
        g[f"kivi-{b}"] = KVSpec(quant=KIVI(bits=b))
    g.update(rotated_grid())
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


def rotated_grid() -> dict[str, KVSpec]:
    """Rotated codes (issue 15): TurboQuant-style Lloyd-Max (``turbo-K/V``: key/value bits, ``-g32``: a scale per
    32 channels, ``-R128``: KIVI's 128-token full-precision window) and rotation around existing codecs."""
    g: dict[str, KVSpec] = {}
    for kb, vb in ((2, 2), (2, 3), (3, 3), (4, 4)):
        g[f"turbo-{kb}/{vb}"] = KVSpec(quant=TurboKV(key_bits=kb, value_bits=vb))
        g[f"turbo-{kb}/{vb}-R128"] = KVSpec(quant=TurboKV(key_bits=kb, value_bits=vb, residual=128))
    for kb, vb, r in ((3, 2, 0), (3, 2, 64), (2, 2, 64), (2, 3, 64), (2, 2, 96), (2, 2, 112)):
        g[f"turbo-{kb}/{vb}" + (f"-R{r}" if r else "")] = KVSpec(quant=TurboKV(key_bits=kb, value_bits=vb, residual=r))
    g["turbo-3/2-g32"] = KVSpec(quant=TurboKV(key_bits=3, value_bits=2, group_size=32))
    g["turbo-2/2-g32"] = KVSpec(quant=TurboKV(key_bits=2, value_bits=2, group_size=32))
    for r in (64, 96, 128):
        g[f"turbo-2/2-g32-R{r}"] = KVSpec(quant=TurboKV(key_bits=2, value_bits=2, group_size=32, residual=r))
    g["int-2"] = KVSpec(quant=IntKV(bits=2))
    g["rot-int-2"] = KVSpec(quant=Rotated(base=IntKV(bits=2)))
    g["rot-uniform-2"] = KVSpec(quant=Rotated(base=UniformKV(bits=2, group_size=32)))
    g["rot-uniform-3"] = KVSpec(quant=Rotated(base=UniformKV(bits=3, group_size=32)))
    g["rot-v-kivi-2"] = KVSpec(quant=Rotated(base=KIVI(bits=2), keys=False))
    g["rot-kivi-2"] = KVSpec(quant=Rotated(base=KIVI(bits=2)))
    g["rot-v-kivi-3"] = KVSpec(quant=Rotated(base=KIVI(bits=3), keys=False))
    return g


KVQUANT_CALIBRATION = ROOT / "results" / "kvquant"


def kvquant_grid(model, tok) -> dict[str, KVSpec]:
    """KVQuant (issue 15): pre-RoPE per-channel keys, Fisher-weighted codebooks per layer fitted on the Lee
    *test* documents (2 x 512 tokens; the perplexity text is the Lee background corpus), 1 % outliers, groups of
    64 (``-uniform``: uniform levels, no calibration; ``-R128``: KIVI's 128-token full-precision window). The
    calibration files are made on first use under ``results/kvquant/``."""
    from lmcompress.eval.tasks.perplexity import text_token_ids
    from lmcompress.kv.quant.kvquant_calibrate import calibrate_kvquant

    g: dict[str, KVSpec] = {}
    ids = text_token_ids(tok, "lee-test")[: 2 * 512].view(2, 512)

    def calibrated(b: int, group: int = 64, out: float = 0.01) -> str:
        path = KVQUANT_CALIBRATION / f"smollm2-135m-{b}bit-g{group}-out{round(out * 100)}.safetensors"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            t0 = time.time()
            calibrate_kvquant(model, ids, bits=b, group_size=group, outliers=out).save(path)
            print(f"calibrated {path.name} in {time.time() - t0:.0f} s", flush=True)
        return str(path)

    for b in (2, 3):
        path = calibrated(b)
        g[f"kvquant-{b}"] = KVSpec(quant=KVQuant(bits=b, calibration=path))
        g[f"kvquant-{b}-R128"] = KVSpec(quant=KVQuant(bits=b, calibration=path, residual=128))
        g[f"kvquant-{b}-uniform"] = KVSpec(quant=KVQuant(bits=b))
    g["kvquant-2-out2"] = KVSpec(quant=KVQuant(bits=2, outliers=0.02, calibration=calibrated(2, out=0.02)))
    g["kvquant-2-g32"] = KVSpec(quant=KVQuant(bits=2, group_size=32, calibration=calibrated(2, group=32)))
    g["kvquant-3-g32"] = KVSpec(quant=KVQuant(bits=3, group_size=32, calibration=calibrated(3, group=32)))
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
        return cache.nbytes, bf16_equivalent_bytes(cache.tensors())
    tensors = []
    for layer in cache.layers:
        tensors += flat_tensors([layer.keys, layer.values, layer._quantized_keys, layer._quantized_values])
    held = sum(t.numel() * t.element_size() for t in tensors)
    bf16 = sum(t.numel() * (2 if t.dtype == torch.float32 else t.element_size()) for t in tensors)
    return held, bf16


# --------------------------------------------------------------------------------------------- tasks
@torch.no_grad()
def perplexity(model, tok, config, context: int, evaluate: int, chunk: int) -> dict:
    """The ``perplexity`` task's protocol with any cache (one window of the Lee corpus)."""
    from lmcompress.eval.tasks.perplexity import text_token_ids

    window = text_token_ids(tok, "lee")[: context + evaluate].unsqueeze(0)
    span = window.shape[1]
    cache = make_cache(model, config)
    compressed = isinstance(cache, CompressedCache)
    with scoring_hooks(model, cache) if compressed else _null():
        out = model(input_ids=window[:, :context], **cache_kwargs(cache), logits_to_keep=1)
    held, bf16 = cache_bytes(cache)
    nll = -float(torch.log_softmax(out.logits[0, -1].float(), -1)[window[0, context]])
    count = 1
    with cache.compression_paused() if compressed else _null():
        for s in range(context, span - 1, chunk):
            e = min(s + chunk, span - 1)
            logp = torch.log_softmax(model(input_ids=window[:, s:e], **cache_kwargs(cache)).logits[0].float(), -1)
            targets = window[0, s + 1 : e + 1]
            nll -= float(logp.gather(1, targets[:, None]).sum())
            count += targets.numel()
    return {"ppl": math.exp(nll / count), "scored": count, "bytes": held, "bytes_bf16": bf16,
            "ratio": uncompressed_bf16_bytes(model, context) / bf16}


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def multiple_choice(model, tok, config, task: str, limit: int | None, shots: int = 0) -> dict:
    from lmcompress.eval.tasks.multiple_choice import bigbench_questions, evaluate

    res = evaluate(model, tok, bigbench_questions(task, limit, shots=shots), lambda m: make_cache(m, config),
                   cache_bytes)
    return {"accuracy": res["accuracy"], "accuracy_mean": res["accuracy_mean"], "questions": res["questions"],
            "prompt_tokens": res["prompt_tokens"], "ratio": res["ratio_bf16"], "bytes_bf16": res["kv_bytes_bf16"]}


@torch.no_grad()
def needle(model, tok, config, tokens: int, trials: int) -> dict:
    """The ``passkey`` task's prompts; context prefilled and compressed, then question and greedy answer."""
    import random

    from lmcompress.eval.tasks.passkey import build_prompt, first_number

    depths = (0.1, 0.5, 0.9)
    found = 0
    ratio_num = ratio_den = 0
    rng = random.Random(0)
    for i in range(trials):
        key = str(rng.randrange(10000, 100000))
        parts = build_prompt(tok, tokens, depths[i % len(depths)], key)
        cache = make_cache(model, config)
        compressed = isinstance(cache, CompressedCache)
        with scoring_hooks(model, cache) if compressed else _null():
            model(parts.context_ids, **cache_kwargs(cache))
        ratio_num += uncompressed_bf16_bytes(model, parts.context_ids.shape[1])
        ratio_den += cache_bytes(cache)[1]
        with cache.compression_paused() if compressed else _null():
            logits = model(parts.question_ids, **cache_kwargs(cache)).logits[0, -1]
        out = []
        tok_id = int(logits.argmax())
        for _ in range(10):
            if tok_id == tok.eos_token_id:
                break
            out.append(tok_id)
            tok_id = int(model(torch.tensor([[tok_id]]), **cache_kwargs(cache)).logits[0, -1].argmax())
        found += int(first_number(tok.decode(out)) == key)
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
    if args.cmd in ("ppl", "needle") and (not args.only or any(p.startswith("kvquant") for p in args.only)):
        configs.update(kvquant_grid(model, tok))
    if args.only:
        configs = {k: v for k, v in configs.items() if any(k.startswith(p) for p in args.only)}
    keys = {"ppl": ("context", "eval", "chunk"), "mc": ("task", "limit", "shots"), "needle": ("tokens", "trials"),
            "kverr": ("tokens", "chunk", "trials")}[args.cmd]
    extra = {"cmd": args.cmd, **{k: getattr(args, k) for k in keys}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    skip = done_labels(args.out, extra)
    for label, config in configs.items():
        if label in skip:
            continue
        t0 = time.time()
        try:
            if args.cmd == "ppl":
                res = perplexity(model, tok, config, args.context, args.eval, args.chunk)
                if label == "fp":  # the replica of the task's protocol gives the task's figure
                    from lmcompress.eval.tasks import Perplexity

                    task = Perplexity(context_tokens=args.context, eval_tokens=args.eval, chunk=args.chunk)
                    res["task_ppl"] = task.run(RunContext(model, tok, config)).metrics["perplexity"]
            elif args.cmd == "mc":
                res = multiple_choice(model, tok, config, args.task, args.limit, args.shots)
            elif args.cmd == "needle":
                res = needle(model, tok, config, args.tokens, args.trials)
            else:
                if isinstance(config, Peer):
                    continue
                task = KVError(samples=args.trials, context_tokens=args.tokens, continuation_tokens=args.chunk)
                out = task.run(RunContext(model, tok, config))
                res = {**out.metrics, **out.costs, "ratio": out.costs["ratio_bf16"]}
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
    parser.add_argument("--tokens", type=int, default=2048, help="needle: prompt length; kverr: context")
    parser.add_argument("--context", type=int, default=1536, help="ppl: compressed prefix")
    parser.add_argument("--eval", type=int, default=512, help="ppl: scored tokens")
    parser.add_argument("--chunk", type=int, default=64, help="ppl: eval chunk; kverr: continuation")
    parser.add_argument("--task", default="general_knowledge")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--shots", type=int, default=0, help="mc: solved examples prepended to every prompt")
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", nargs="*", help="labels starting with these prefixes")
    args = parser.parse_args()
    if args.cmd == "table":
        table(args.path)
        return
    if args.out is None:
        parser.error("--out is required")
    run(args)


if __name__ == "__main__":
    main()
