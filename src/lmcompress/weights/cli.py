"""``lmcompress awq ...`` subcommands: ``quantize`` a model to an AWQ GEMM checkpoint, ``eval`` one.

:func:`add_awq_subcommands` puts them under ``lmcompress``'s own parser (:mod:`lmcompress.cli`);
``python -m lmcompress.weights.cli awq ...`` runs them standalone too.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import LMCompressError
from .config import SUPPORTED_GROUP_SIZES

PROVENANCE_FILE = "lmcompress_quantization.json"
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def add_awq_subcommands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``awq quantize`` and ``awq eval`` under ``subparsers``; each sets ``func`` to its handler."""
    from .config import CALIBRATION_SOURCES, SUPPORTED_GROUP_SIZES, AWQConfig

    defaults = AWQConfig()
    awq = subparsers.add_parser("awq", help="4-bit AWQ / RTN weight quantization")
    sub = awq.add_subparsers(dest="awq_command", required=True)

    q = sub.add_parser("quantize", help="quantize MODEL and save an AWQ GEMM checkpoint to OUT")
    q.add_argument(
        "model", help="embedded model name (smollm2-135m, gemma3-270m), local folder or .gguf file"
    )
    q.add_argument("out", help="output folder (written atomically; must not exist or be empty, see --overwrite)")
    q.add_argument("--method", choices=("awq", "rtn"), default="awq")
    q.add_argument("--bits", type=int, default=defaults.bits)
    q.add_argument(
        "--group-size", type=int, default=defaults.group_size, help=f"one of {SUPPORTED_GROUP_SIZES}"
    )
    q.add_argument("--no-zero-point", dest="zero_point", action="store_false", help="symmetric codes")
    q.add_argument("--calib-source", choices=CALIBRATION_SOURCES, default=defaults.calib_source)
    q.add_argument("--calib-samples", type=int, default=defaults.calib_samples)
    q.add_argument("--calib-seq-len", type=int, default=defaults.calib_seq_len)
    q.add_argument("--calib-batch", type=int, default=defaults.calib_batch)
    q.add_argument("--seed", type=int, default=defaults.seed)
    q.add_argument("--n-grid", type=int, default=defaults.n_grid, help="points of the scale grid")
    q.add_argument("--duo-scaling", action="store_true", help="AutoAWQ's weight-and-activation scales")
    q.add_argument("--no-clip", dest="clip", action="store_false", help="skip the clip search")
    q.add_argument(
        "--device", default=None, help="where each layer is processed (default: cuda if available)"
    )
    q.add_argument("--dtype", choices=(*_DTYPES, "keep"), default="float16",
                   help="stored dtype of the non-quantized tensors (AutoAWQ/vLLM expect float16)")  # fmt: skip
    q.add_argument("--format", choices=("awq", "compressed-tensors"), default="awq",
                   help="awq: AutoAWQ GEMM (lmcompress, vLLM); compressed-tensors: W4A16 pack-quantized "
                   "(transformers with the compressed-tensors package, vLLM, llm-compressor's format)")  # fmt: skip
    q.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty OUT, only if it is a checkpoint lmcompress wrote")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=run_quantize)

    e = sub.add_parser("eval", help="perplexity and KL of checkpoints against their original model")
    e.add_argument("checkpoint", nargs="+",
                   help="checkpoint folder(s): AWQ GEMM or compressed-tensors W4A16, ours or another tool's; "
                   "several are evaluated on the same tokens against one reference")  # fmt: skip
    e.add_argument(
        "--reference", default=None, help="original model (default: the one recorded in CHECKPOINT)"
    )
    e.add_argument("--text", default="lee-test", help="held-out text source")
    e.add_argument("--window", type=int, default=512)
    e.add_argument("--max-tokens", type=int, default=None)
    e.add_argument("--device", default=None)
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    e.set_defaults(func=run_eval)
    return awq


def _work_device(arg: str | None) -> str:
    from ..devices import check_device

    if arg:
        return check_device(arg)
    return "cuda" if torch.cuda.is_available() else "cpu"


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def check_group_size(model: str, group_size: int) -> None:
    """Fail before loading weights when ``group_size`` does not divide every linear's input width (read from
    the model's config or GGUF metadata)."""
    from ..models import linear_input_widths

    widths = linear_input_widths(model)
    bad = {name: width for name, width in widths.items() if width % group_size}
    if bad:
        divisors = [g for g in SUPPORTED_GROUP_SIZES if all(w % g == 0 for w in widths.values())]
        name, width = next(iter(bad.items()))
        allowed = ", ".join(map(str, divisors)) if divisors else "none of the supported sizes"
        raise LMCompressError(
            f"--group-size={group_size} does not divide {model}'s {name}={width}; allowed for this model: {allowed}"
        )


def run_quantize(args: argparse.Namespace) -> int:
    from ..models import check_model_source, load_model
    from .checkpoint import check_output_dir, save_quantized
    from .config import AWQConfig, RTNConfig
    from .quantize import quantize_

    fmt = dict(bits=args.bits, group_size=args.group_size, zero_point=args.zero_point)
    if args.method == "awq":
        config = AWQConfig(
            **fmt, calib_source=args.calib_source, calib_samples=args.calib_samples,
            calib_seq_len=args.calib_seq_len, calib_batch=args.calib_batch, seed=args.seed,
            duo_scaling=args.duo_scaling, clip=args.clip, n_grid=args.n_grid,
        )  # fmt: skip
    else:
        config = RTNConfig(**fmt)
    out = Path(args.out)
    check_output_dir(out, overwrite=args.overwrite)  # before any model loads: nothing is lost on a bad OUT
    work_device = _work_device(args.device)
    check_model_source(args.model)
    check_group_size(args.model, config.group_size)
    start = time.perf_counter()
    model, tokenizer = load_model(args.model)
    load_seconds = time.perf_counter() - start
    report = quantize_(
        model, config, tokenizer=tokenizer, device=work_device, progress=not args.quiet
    )
    model.to("cpu")
    dtype = None if args.dtype == "keep" else _DTYPES[args.dtype]
    provenance = {
        "source_model": args.model,
        "config": config.to_dict(),
        "quantize_seconds": report.seconds,
        "load_seconds": load_seconds,
        "peak_device_bytes": report.peak_device_bytes,
        "peak_rss_bytes": _peak_rss_bytes(),
        "layers": report.layers,
        "linears": report.linears,
        "details": report.details,
    }
    save_quantized(
        model, out, tokenizer=tokenizer, dtype=dtype, overwrite=args.overwrite,
        extra_files={PROVENANCE_FILE: json.dumps(provenance, indent=2) + "\n"}, format=args.format,
    )  # fmt: skip
    print(
        f"{config.method}: {report.layers} layers, {report.linears} linears in {report.seconds:.1f} s "
        f"(peak RSS {provenance['peak_rss_bytes'] / 2**30:.2f} GiB"
        + (f", peak device {report.peak_device_bytes / 2**30:.2f} GiB" if report.peak_device_bytes else "")
        + f") -> {out}"
    )
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from ..models import load_model
    from .checkpoint import checkpoint_format, load_quantized
    from .evaluate import evaluate_lm, held_out_ids, start_tokens

    folders = [Path(c) for c in args.checkpoint]
    if args.window < 2:
        raise LMCompressError(
            f"--window={args.window} is not allowed; it must be an integer >= 2 (tokens per evaluation window)"
        )
    if args.max_tokens is not None and args.max_tokens < 1:
        raise LMCompressError(f"--max-tokens={args.max_tokens} is not allowed; it must be an integer >= 1")
    for folder in folders:
        if not folder.is_dir():
            raise LMCompressError(f"checkpoint {str(folder)!r} is not a folder; give one written by `awq quantize`")
    reference_name = args.reference
    for folder in folders:
        provenance_path = folder / PROVENANCE_FILE
        if reference_name is None and provenance_path.is_file():
            reference_name = json.loads(provenance_path.read_text()).get("source_model")
    device = _work_device(args.device)
    if reference_name is not None:
        from ..models import check_model_source

        check_model_source(reference_name)
    dtype = torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    models = [load_quantized(folder, dtype=dtype, device=device) for folder in folders]  # all checked first
    tokenizer = next((t for _, t in models if t is not None), None)
    reference = None
    if reference_name is not None:
        reference, ref_tokenizer = load_model(reference_name, dtype=dtype, device=device)
        tokenizer = tokenizer or ref_tokenizer
    if tokenizer is None:
        raise LMCompressError(
            f"checkpoint {str(folders[0])!r} has no tokenizer and no --reference model gives one"
        )
    ids = held_out_ids(tokenizer, args.text, args.max_tokens)
    prefix = start_tokens(tokenizer)
    results = [
        evaluate_lm(model, ids, reference=reference, window=args.window, prefix=prefix).to_dict()
        for model, _ in models
    ]
    result: dict[str, Any] = {"quantized": results[0]}
    if len(folders) > 1:
        result["checkpoints"] = [
            {"path": str(f), "weights": checkpoint_format(f), **r} for f, r in zip(folders, results)
        ]
    if reference is not None:
        result["reference"] = evaluate_lm(reference, ids, window=args.window, prefix=prefix).to_dict()
        result["reference_model"] = reference_name
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for folder, qr in zip(folders, results):
        line = f"{folder}: " if len(folders) > 1 else ""
        line += f"perplexity {qr['perplexity']:.3f} over {qr['tokens']} tokens"
        if reference is not None:
            line += (
                f"; reference {result['reference']['perplexity']:.3f}; KL {qr['kl']:.4f} nats/token; "
                f"top-1 agreement {qr['top1_agreement']:.3f}"
            )
        print(line)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: ``python -m lmcompress.weights.cli awq quantize|eval ...``."""
    parser = argparse.ArgumentParser(prog="lmcompress")
    add_awq_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except LMCompressError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
