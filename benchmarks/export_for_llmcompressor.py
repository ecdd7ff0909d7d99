"""Write the default model as a plain Hugging Face folder and our AWQ calibration token blocks, for a run of
llm-compressor in its own virtual environment (benchmarks/llmcompressor_awq.py).

    PYTHONPATH=src python benchmarks/export_for_llmcompressor.py OUT_DIR --model smollm2-135m \
        --calib-samples 16 --calib-seq-len 256

Writes ``OUT_DIR/model/`` (config, float32 safetensors, tokenizer) and ``OUT_DIR/calib.json`` (the
``[samples, seq_len]`` token ids :func:`lmcompress.weights.calibration.calibration_tokens` gives for the Lee
corpus and seed, exactly what ``lmcompress awq quantize`` calibrates on).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from lmcompress._compat import detached_hf_quantizer
from lmcompress.models import load_model
from lmcompress.weights.calibration import calibration_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calib-source", default="lee")
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--calib-seq-len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    model, tokenizer = load_model(args.model, dtype=torch.float32, quiet=True)
    with detached_hf_quantizer(model):  # a GGUF-loaded model keeps the spent GGUF quantizer, which refuses saving
        model.save_pretrained(out / "model")
    config_path = out / "model" / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("quantization_config", None)  # the GGUF marker: the saved weights are plain float32
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(out / "model")
    ids = calibration_tokens(tokenizer, args.calib_source, args.calib_samples, args.calib_seq_len, args.seed)
    (out / "calib.json").write_text(json.dumps({"input_ids": ids.tolist(), "source": vars(args)}) + "\n")
    print(f"wrote {out / 'model'} and {out / 'calib.json'} ({tuple(ids.shape)} tokens)")


if __name__ == "__main__":
    main()
