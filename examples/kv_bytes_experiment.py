"""A Python experiment (``lmcompress.runner.experiment``): KV bytes held after the prompt, per eviction ratio and
KV quantizer, as a fraction of the uncompressed cache, on the decode-cost task (random prompt ids: no tokenizer
needed, so it also runs on the tiny test models).

    python examples/kv_bytes_experiment.py                       # the default model (SmolLM2-135M)
    python examples/kv_bytes_experiment.py --model tiny-llama    # seconds, for a first try

Rerunning it computes nothing that is already in the store.
"""

from __future__ import annotations

import argparse

from lmcompress.eval.tasks import DecodeCost
from lmcompress.kv.parse import parse_method
from lmcompress.runner.experiment import Experiment, run_experiment
from lmcompress.runner.spec import RunSpec


class KVBytes(Experiment):
    name = "kv-bytes"

    def __init__(self, model: str, length: int) -> None:
        self.model, self.length = model, length

    def specs(self):
        task = DecodeCost(length=self.length, new_tokens=4)
        yield RunSpec(self.model, parse_method("none"), task)
        for quant in ("", "+int4:group_size=16"):
            for ratio in (0.25, 0.5, 0.75):
                yield RunSpec(self.model, parse_method("snapkv" + quant, ratio=ratio), task)

    def process(self, records):
        full = records[0]["result"]["costs"]["kv_bytes"]
        return {r["spec"]["kv_label"]: (r["result"]["costs"]["kv_bytes"] / full if r["status"] == "ok" else None)
                for r in records}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--store", default="out/examples/kv_bytes.sqlite")
    args = parser.parse_args()
    for label, fraction in run_experiment(KVBytes(args.model, args.length), args.store).items():
        print(f"{label:45s} {'failed' if fraction is None else f'{fraction:.3f}'}")


if __name__ == "__main__":
    main()
