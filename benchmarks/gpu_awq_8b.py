"""AWQ of a Llama-3.1-8B-shaped model with random bf16 weights on one GPU: wall time and peak GPU memory.

    python benchmarks/gpu_awq_8b.py --out DIR        # writes DIR/gpu_awq_8b.json, prints a summary

The model (32 layers, hidden 4096, intermediate 14336, 32 heads, 8 KV heads, vocab 128256) is initialized on the
GPU (fast), then moved to the CPU; ``quantize_`` brings one decoder layer at a time to the GPU, so peak GPU
memory is about one layer plus the calibration activations. Calibration: 128 sequences of 512 random token ids
(AutoAWQ's default size; no tokenizer on the GPU machine; random weights make the numbers meaningful for time
and memory only). Afterwards the quantized model runs one forward pass on the GPU through the W4A16 kernels
(untuned default configurations) as a check that it works. About 2-4 minutes on an H100.

``--tiny`` runs the same pipeline on a small config on the CPU (checks the script, not the GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

_SRC = Path(__file__).resolve().parents[1] / "src"
if _SRC.is_dir():  # this checkout's code, even where another lmcompress is installed
    sys.path.insert(0, str(_SRC))

from lmcompress.weights import AWQConfig, WQLinear, quantize_  # noqa: E402


def llama_8b_config(layers: int, tiny: bool):
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(
            vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=1024,
            tie_word_embeddings=False,
        )  # fmt: skip
    return LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=8192,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
    )  # fmt: skip


SHAPE_FIELDS = (
    "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "vocab_size",
)  # fmt: skip


def tensor_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="results", help="folder for gpu_awq_8b.json")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--keep-on-gpu", action="store_true", help="keep all layers on the GPU (no offload)")
    parser.add_argument("--tiny", action="store_true", help="small config on the CPU: a check of this script")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    device = torch.device("cpu" if args.tiny else "cuda")
    config = llama_8b_config(args.layers, args.tiny)
    torch.manual_seed(0)
    start = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.eval()
    if not args.keep_on_gpu:
        model.to("cpu")
    build_s = time.perf_counter() - start
    bytes_before = tensor_bytes(model)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    print(f"built {config.num_hidden_layers}-layer model ({bytes_before / 2**30:.2f} GiB bf16) in {build_s:.1f} s",
          flush=True)  # fmt: skip

    awq = AWQConfig(
        group_size=args.group_size, calib_source="random", calib_samples=args.calib_samples,
        calib_seq_len=args.calib_seq_len, seed=0,
    )  # fmt: skip
    report = quantize_(model, awq, device=device, progress=True)
    bytes_after = tensor_bytes(model)
    packed = sum(m.nbytes for m in model.modules() if isinstance(m, WQLinear))
    alphas = [a for d in report.details for a in d["alpha"].values()]
    print(f"AWQ: {report.layers} layers, {report.linears} linears in {report.seconds:.1f} s "
          f"({report.seconds / report.layers:.2f} s/layer); peak GPU memory "
          f"{(report.peak_device_bytes or 0) / 2**30:.2f} GiB", flush=True)  # fmt: skip

    # one forward pass of the quantized model through the W4A16 kernels (default configs, no tuning)
    os.environ["LMCOMPRESS_W4A16_TUNE"] = "0"
    model.to(device)
    tokens = torch.randint(0, config.vocab_size, (1, 64), device=device)
    forward = {}
    with torch.no_grad():
        for label, ids in (("prefill_64", tokens), ("one_token", tokens[:, :1])):
            model(input_ids=ids, use_cache=False)  # compile / warm up
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            logits = model(input_ids=ids, use_cache=False).logits
            if device.type == "cuda":
                torch.cuda.synchronize()
            forward[label] = {
                "ms": (time.perf_counter() - t0) * 1e3,
                "finite": bool(torch.isfinite(logits).all()),
            }
    print(f"quantized forward on {device}: {forward}", flush=True)

    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (tiny check)",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "config": {k: getattr(config, k) for k in SHAPE_FIELDS},
        "awq": awq.to_dict(),
        "layers_offloaded_to_cpu": not args.keep_on_gpu,
        "build_seconds": build_s,
        "quantize_seconds": report.seconds,
        "seconds_per_layer": report.seconds / report.layers,
        "peak_gpu_bytes": report.peak_device_bytes,
        "model_bytes_before": bytes_before,
        "model_bytes_after": bytes_after,
        "packed_linear_bytes": packed,
        "alpha_mean": sum(alphas) / len(alphas),
        "alpha_per_layer": [d["alpha"] for d in report.details],
        "forward_check": forward,
    }
    print()
    print("| model | calibration | AWQ wall time | per layer | peak GPU memory | model before -> after |")
    print("|---|---|---|---|---|---|")
    print(f"| Llama-3.1-8B shape, random bf16, {report.layers} layers | {args.calib_samples} x {args.calib_seq_len} "
          f"random tokens | {report.seconds:.1f} s | {report.seconds / report.layers:.2f} s | "
          f"{(report.peak_device_bytes or 0) / 2**30:.2f} GiB | {bytes_before / 2**30:.2f} -> "
          f"{bytes_after / 2**30:.2f} GiB |")  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_awq_8b.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
