"""Our compressed-tensors checkpoint in plain transformers: convert a 4-bit checkpoint folder (AWQ GEMM or CT)
to compressed-tensors, load that with ``transformers.AutoModelForCausalLM.from_pretrained`` (the
``compressed-tensors`` package decompresses it) and with our ``load_quantized``, and compare their logits on
held-out text.

    PYTHONPATH=src python benchmarks/ct_plain_transformers.py CHECKPOINT OUT_CT [--tokens 512]

Prints one JSON line: versions, tokens, max abs logit difference, the largest |logit|, top-1 agreement.
"""

from __future__ import annotations

import argparse
import json

import compressed_tensors
import torch
import transformers
from transformers import AutoModelForCausalLM

from lmcompress.weights import load_quantized, save_quantized
from lmcompress.weights.evaluate import held_out_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("out")
    parser.add_argument("--tokens", type=int, default=512)
    args = parser.parse_args()
    model, tokenizer = load_quantized(args.checkpoint)
    save_quantized(model, args.out, tokenizer=tokenizer, format="compressed-tensors", overwrite=True)
    ours, _ = load_quantized(args.out, dtype=torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32).eval()
    ids = held_out_ids(tokenizer, "lee-test", args.tokens)[None]
    with torch.no_grad():
        a = ours(ids, use_cache=False).logits.float()
        b = theirs(ids, use_cache=False).logits.float()
    print(json.dumps({
        "transformers": transformers.__version__, "compressed_tensors": compressed_tensors.__version__,
        "torch": torch.__version__, "tokens": ids.shape[1], "max_abs_diff": float((a - b).abs().max()),
        "max_abs_logit": float(a.abs().max()), "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
    }))


if __name__ == "__main__":
    main()
