"""Quality and cost of 4-bit AWQ against RTN on a real model (CPU or GPU).

For each method: copy the loaded model, quantize it (wall time; peak RSS sampled every 20 ms, and peak CUDA
memory on a GPU), then score perplexity and KL divergence against the unquantized model on held-out text
(``lee-test``: 50 news articles that calibration, on ``lee``, never sees).

    PYTHONPATH=src python benchmarks/awq_eval.py --model smollm2-135m --group-size 64 --out results/awq_smollm2.json

The embedded models' weights come from Q4 GGUF files dequantized on load, so "full precision" here means that
dequantized model.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import threading
import time
from pathlib import Path

import torch

from lmcompress.models import load_model
from lmcompress.weights import AWQConfig, RTNConfig, WQLinear, quantize_
from lmcompress.weights.evaluate import evaluate_lm, held_out_ids, start_tokens


class RSSSampler:
    """Peak resident set size of this process while the block runs (sampled from /proc/self/statm)."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval)

    def __enter__(self) -> RSSSampler:
        self.start_rss = self._rss()
        self.peak = self.start_rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def linear_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes of packed WQLinear tensors, bytes of remaining nn.Linear weights) in the decoder."""
    packed = sum(m.nbytes for m in model.modules() if isinstance(m, WQLinear))
    plain = sum(
        m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, torch.nn.Linear)
    )
    return packed, plain


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", default="rtn,awq", help="comma list of rtn, awq, awq-duo")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--calib-seq-len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy machine)"
    )
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    t0 = time.perf_counter()
    reference, tokenizer = load_model(args.model, dtype=dtype, device=device)
    load_s = time.perf_counter() - t0
    ids = held_out_ids(tokenizer, "lee-test", args.max_tokens)
    prefix = start_tokens(tokenizer)
    ref_quality = evaluate_lm(reference, ids, window=args.window, prefix=prefix)
    print(f"loaded {args.model} in {load_s:.1f} s; reference perplexity {ref_quality.perplexity:.3f} "
          f"on {ref_quality.tokens} tokens", flush=True)  # fmt: skip
    fmt = dict(bits=4, group_size=args.group_size, zero_point=True)
    calib = dict(calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len, seed=args.seed)
    configs = {
        "rtn": RTNConfig(**fmt),
        "awq": AWQConfig(**fmt, **calib),
        "awq-duo": AWQConfig(**fmt, **calib, duo_scaling=True),
    }
    rows = []
    for name in args.methods.split(","):
        config = configs[name]
        model = copy.deepcopy(reference)
        if device.type == "cuda":
            torch.cuda.synchronize()
        with RSSSampler() as rss:
            report = quantize_(model, config, tokenizer=tokenizer, device=device, progress=False)
        quality = evaluate_lm(model, ids, reference=reference, window=args.window, prefix=prefix)
        packed, plain = linear_bytes(model)
        row = {
            "method": name,
            "config": config.to_dict(),
            "quantize_seconds": report.seconds,
            "rss_before_bytes": rss.start_rss,
            "peak_rss_bytes": rss.peak,
            "peak_cuda_bytes": report.peak_device_bytes,
            "packed_linear_bytes": packed,
            "unquantized_linear_bytes": plain,
            **{f"eval_{k}": v for k, v in quality.to_dict().items()},
            "alpha_per_layer": [d.get("alpha") for d in report.details] if report.details else None,
        }
        rows.append(row)
        print(f"{name}: quantized in {report.seconds:.1f} s, perplexity {quality.perplexity:.3f}, "
              f"KL {quality.kl:.4f}, top-1 agreement {quality.top1_agreement:.3f}", flush=True)  # fmt: skip
        del model

    result = {
        "model": args.model,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs"
        + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average_at_end": os.getloadavg(),
        "device": str(device),
        "dtype": str(dtype),
        "text": "lee-test",
        "window": args.window,
        "window_prefix": prefix,
        "reference_perplexity": ref_quality.perplexity,
        "tokens": ref_quality.tokens,
        "load_seconds": load_s,
        "rows": rows,
    }
    print()
    print(f"| method | perplexity | KL (nats/token) | top-1 agree | quantize s | peak RSS GiB | "
          f"{args.model} on lee-test, {ref_quality.tokens} tokens |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    print(f"| full precision (dequantized GGUF) | {ref_quality.perplexity:.3f} | 0 | 1 | – | – | |")
    for r in rows:
        print(f"| {r['method']} g{args.group_size} | {r['eval_perplexity']:.3f} | {r['eval_kl']:.4f} | "
              f"{r['eval_top1_agreement']:.3f} | {r['quantize_seconds']:.1f} | {r['peak_rss_bytes'] / 2**30:.2f} | |")  # fmt: skip
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
