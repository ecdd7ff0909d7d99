"""KVzip's extra prefill cost: time to first token with and without KVzip's context reconstruction.

The default model answers one question after a ``--tokens``-token context of Lee-corpus text through the
evaluation pipeline (query-agnostic: the context is prefilled and compressed, then the question is fed with
compression paused). TTFT covers both prefills, KVzip's reconstruction forwards and the first answer token. For
every spec the median of ``--repeats`` runs (interleaved across specs, after a short warm-up) is reported with the KV bytes held after
the prompt, as a Markdown table on stdout and JSON in ``--out``. Besides wall-clock TTFT the process CPU time
of the same call is reported: with ``--threads 1`` it measures the work done, unaffected by other processes
sharing the machine.

    PYTHONPATH=src python benchmarks/kvzip_prefill_cost.py --tokens 2048 --repeats 1 --threads 1 --out out/kvzip_cost.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

SPECS = ("none", "snapkv:ratio=0.5", "kvzip:ratio=0.5", "kvzip_plus:ratio=0.5")
QUESTION = "\nQuestion: What is this text mainly about? Answer in one sentence.\nAnswer:"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--specs", nargs="+", default=list(SPECS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="out/kvzip_cost.json")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); with 1 the "
                        "process CPU time measures the work done even on a loaded machine")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from lmcompress.eval.pipeline import answer
    from lmcompress.eval.text import english_text
    from lmcompress.kv.parse import parse_method
    from lmcompress.models import load_model

    model, tok = load_model(args.model, device=args.device, quiet=True)
    ids = tok(english_text("lee"), return_tensors="pt").input_ids[:, : args.tokens]
    if ids.shape[1] < args.tokens:
        raise SystemExit(f"only {ids.shape[1]} tokens of text")
    question = tok(QUESTION, return_tensors="pt", add_special_tokens=False).input_ids
    specs = {text: parse_method(text) for text in args.specs}
    for spec in specs.values():  # warm-up on a short context
        answer(model, ids[:, :128], question, spec, tokenizer=tok, max_new_tokens=1)
    times: dict[str, list[float]] = {text: [] for text in specs}
    cpu: dict[str, list[float]] = {text: [] for text in specs}
    gens = {}
    for _ in range(args.repeats):  # interleaved, so that a change of machine load hits every spec alike
        for text, spec in specs.items():
            c0 = time.process_time()
            gens[text] = answer(model, ids, question, spec, tokenizer=tok, max_new_tokens=1)
            cpu[text].append(time.process_time() - c0)
            times[text].append(gens[text].ttft_s)
            print(f"{text}: TTFT {times[text][-1]:.2f}s wall, {cpu[text][-1]:.2f}s CPU", flush=True)
    rows = [{"spec": text, "ttft_s": statistics.median(times[text]), "ttft_runs_s": times[text],
             "cpu_s": statistics.median(cpu[text]), "cpu_runs_s": cpu[text],
             "kv_bytes": gens[text].kv_bytes} for text in specs]
    base = rows[0]["ttft_s"]
    print(f"\n{args.tokens}-token context, {args.model}, {args.device}, torch threads {torch.get_num_threads()}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    base_cpu = rows[0]["cpu_s"]
    print("| spec | TTFT wall (s) | vs none | TTFT CPU time (s) | vs none | KV bytes after prompt |\n"
          "|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['spec']} | {r['ttft_s']:.2f} | {r['ttft_s'] / base:.2f}x | {r['cpu_s']:.2f} | "
              f"{r['cpu_s'] / base_cpu:.2f}x | {r['kv_bytes']:,} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"tokens": args.tokens, "model": args.model, "device": args.device,
                                          "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
