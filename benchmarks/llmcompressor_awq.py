"""Run llm-compressor's AWQ ``oneshot`` on a model folder with given calibration tokens and save its
compressed-tensors (pack-quantized W4A16) checkpoint. Runs in llm-compressor's own virtual environment (it pins
its own transformers), never imports lmcompress:

    /work/venv-llmc/bin/python benchmarks/llmcompressor_awq.py EXPORT_DIR OUT --group-size 64

``EXPORT_DIR`` is what benchmarks/export_for_llmcompressor.py wrote (``model/`` and ``calib.json``). The recipe
is llm-compressor's documented AWQ one: ``AWQModifier`` (its defaults: duo scaling; ``--n-grid`` points) followed by
``QuantizationModifier`` with 4-bit asymmetric group weights on every ``Linear`` except ``lm_head``.

On a machine without an accelerator llm-compressor 0.14.0.1's AWQ fails in ``IntermediatesCache.pin_memory``
("Cannot access accelerator device when none is available": it pins cached activations unconditionally, to speed
up host-to-device copies). There this script makes that method a no-op; pinning never changes a value.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
from llmcompressor.modifiers.transform.awq import AWQModifier
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir")
    parser.add_argument("out")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--symmetric", action="store_true")
    parser.add_argument("--n-grid", type=int, default=20, help="AWQModifier's scale grid (its default: 20)")
    args = parser.parse_args()
    src = Path(args.export_dir)
    ids = json.loads((src / "calib.json").read_text())["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(src / "model", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src / "model")
    dataset = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]})
    weights = {"num_bits": 4, "type": "int", "symmetric": args.symmetric, "strategy": "group",
               "group_size": args.group_size}  # fmt: skip
    recipe = [
        AWQModifier(n_grid=args.n_grid),
        QuantizationModifier(
            config_groups={"group_0": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"]
        ),
    ]
    if not torch.cuda.is_available():
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, *a, **k: None  # see the module docstring
    start = time.perf_counter()
    oneshot(model=model, dataset=dataset, recipe=recipe, max_seq_length=len(ids[0]),
            num_calibration_samples=len(ids))  # fmt: skip
    seconds = time.perf_counter() - start
    model.save_pretrained(args.out, save_compressed=True)
    tokenizer.save_pretrained(args.out)
    print(f"oneshot AWQ on {len(ids)} x {len(ids[0])} tokens in {seconds:.1f} s -> {args.out}")


if __name__ == "__main__":
    main()
