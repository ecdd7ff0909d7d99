"""Cross-check lmcompress's eviction policies against kvpress 0.5.5 on the same model and input.

kvpress pins transformers < 5.3, so it runs in its own virtual environment: this script re-runs itself there
(``--side kvpress``, importing only torch/transformers/kvpress) and compares, for every method and ratio:

* the kept token indices per layer and KV head (kvpress's compressed keys are matched back to the full keys of
  an uncompressed prefill; AdaKV's kept set is the complement of kvpress's masked indices);
* the logits of a continuation fed after the compressed prompt (the next-token logits are the last row).

Usage (kvpress environment: ``python3 -m venv /work/venv-kvpress && /work/venv-kvpress/bin/pip install
torch==2.13.0 kvpress==0.5.5 "transformers<5.3"``)::

    PYTHONPATH=src python benchmarks/crosscheck_kvpress.py --model /path/to/hf-model-folder \
        --kvpress-python /work/venv-kvpress/bin/python --out out/crosscheck

The model folder must be a Hugging Face folder both transformers versions load (e.g. SmolLM2 re-saved with
``save_pretrained`` after loading the GGUF); ``--tokens`` should be a multiple of 4 so that ``r * n`` is whole at
every ratio and both libraries keep the same count (kvpress keeps ``int(n * (1 - r))``, we ``n - floor(r n)``;
keep to ratios exact in binary such as 0.25 / 0.5 / 0.75: at r = 0.9, 1 - r = 0.0999... and kvpress keeps 299 of
n = 3000 where we keep 300).

Methods: the ``METHOD_CLASSES`` table (scorers built with a ratio, and ``adakv_`` + any of them) and the
``H11B_PRESSES`` block (kvpress's wrappers and other scorers: ChunkKV, BlockPress, ChunkPress, per-layer ratios,
composition, LagKV, CUR, NonCausalAttn, CapPress, EntropyGatedChunkKV, KeyRerotation; ThinK alone and after SnapKV:
kept key channel sets are compared too).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

import torch

from lmcompress._compat import cache_kwargs

RATIOS = (0.25, 0.5, 0.75)
METHODS = ("knorm", "snapkv", "streaming_llm", "tova", "expected_attention", "pyramidkv", "observed_attention",
           "adakv_snapkv")
SUFFIX_TEXT = "\nQuestion: What is this article mainly about? Answer in one sentence.\nAnswer:"


# ----------------------------------------------------------------------------------------------- kvpress side


# method -> (kvpress press class, lmcompress policy class, extra keyword arguments of both); "adakv_<base>" wraps
# the base method's press/policy in AdaKV. Strings only: the kvpress side imports neither lmcompress nor its deps.
METHOD_CLASSES = {
    "knorm": ("KnormPress", "Knorm", {}),
    "snapkv": ("SnapKVPress", "SnapKV", {}),
    "streaming_llm": ("StreamingLLMPress", "StreamingLLM", {}),
    "tova": ("TOVAPress", "TOVA", {}),
    "expected_attention": ("ExpectedAttentionPress", "ExpectedAttention", {}),
    "pyramidkv": ("PyramidKVPress", "PyramidKV", {}),
    "observed_attention": ("ObservedAttentionPress", "ObservedAttention", {}),
    # a pyramid that is well formed on a short prompt
    "pyramidkv_w8_beta4": ("PyramidKVPress", "PyramidKV", {"window_size": 8, "beta": 4}),
}

# ---------------------------------------------------------------------------------- h11a: KVzip, CriticalKV
# KVzip(+) and CriticalAdaKV only mask in kvpress: our kept set is compared with the complement of its
# masked_key_indices. "criticalkv_<base>" / "criticaladakv_<base>" wrap a base method of METHOD_CLASSES.
METHOD_CLASSES.update({
    "kvzip": ("KVzipPress", "KVzip", {}),
    "kvzip_plus": ("KVzipPress", "KVzipPlus", {}),
    "expected_attention_novnorm": ("ExpectedAttentionPress", "ExpectedAttention", {"use_vnorm": False}),
})
#: keyword arguments one side only takes (kvpress's KVzip+ is a flag; our KVzip needs the chat-template prefix
#: length that kvpress derives from the tokenizer: it does not reconstruct those leading tokens).
KVPRESS_ONLY_KWARGS = {"kvzip_plus": {"kvzip_plus_normalization": True}}
OURS_ONLY_KWARGS = {"kvzip": {"prefix_tokens": "chat_prefix"}, "kvzip_plus": {"prefix_tokens": "chat_prefix"}}
WRAPPERS = {"adakv_": ("AdaKVPress", "AdaKV"), "criticalkv_": ("CriticalKVPress", "CriticalKV"),
            "criticaladakv_": ("CriticalAdaKVPress", "CriticalAdaKV")}
#: methods whose kvpress press masks instead of compressing (kept set = complement of masked_key_indices).
MASKED = ("adakv_", "criticaladakv_", "kvzip")


def chat_prefix_tokens(tok) -> int:
    """Tokens of the chat template before a user message (kvpress's KVzip ``prefix_length``)."""
    if getattr(tok, "chat_template", None) is None:
        return 0
    marker = "\n" + "#" * 13
    text = tok.apply_chat_template([{"role": "user", "content": "dummy context" + marker}],
                                   add_generation_prompt=True, tokenize=False, enable_thinking=False)
    prefix = text.split(marker)[0].split("dummy context")[0]
    return len(tok.encode(prefix, add_special_tokens=False))
# ------------------------------------------------------------------------------- end of h11a block


# ---- issue 11, part b (h11b): kvpress wrappers and the other scorers. Each entry builds the press / our policy
# at a ratio from the kvpress / lmcompress.kv.evict module; "match" says how kvpress's kept keys are matched back
# ("norm": by key norm, for re-rotated keys), "start" where kvpress's continuation starts ("held": at the
# compressed length, as its pipeline does after key re-rotation).
def _layer_ratios(r: float, num_layers: int = 30) -> list[float]:
    return [r if i % 2 == 0 else r / 2 for i in range(num_layers)]


H11B_PRESSES = {
    "chunkkv_knorm": (lambda kp, r: kp.ChunkKVPress(press=kp.KnormPress(compression_ratio=r), chunk_length=16),
                      lambda ev, r: ev.ChunkKV(base=ev.Knorm(ratio=r), chunk_length=16), {}),
    "chunkkv_snapkv": (lambda kp, r: kp.ChunkKVPress(press=kp.SnapKVPress(compression_ratio=r), chunk_length=16),
                       lambda ev, r: ev.ChunkKV(base=ev.SnapKV(ratio=r), chunk_length=16), {}),
    "block_keydiff": (lambda kp, r: kp.BlockPress(press=kp.KeyDiffPress(compression_ratio=r), block_size=128),
                      lambda ev, r: ev.BlockPress(base=ev.KeyDiff(ratio=r), block_size=128), {}),
    "chunk_keydiff": (lambda kp, r: kp.ChunkPress(press=kp.KeyDiffPress(compression_ratio=r), chunk_length=128),
                      lambda ev, r: ev.ChunkPress(base=ev.KeyDiff(ratio=r), chunk_length=128), {}),
    "per_layer_snapkv": (lambda kp, r: kp.PerLayerCompressionPress(press=kp.SnapKVPress(),
                                                                   compression_ratios=_layer_ratios(r)),
                         lambda ev, r: ev.PerLayerCompression(base=ev.SnapKV(), ratios=tuple(_layer_ratios(r))), {}),
    "composed_snapkv_knorm": (
        lambda kp, r: kp.ComposedPress([kp.SnapKVPress(compression_ratio=r), kp.KnormPress(compression_ratio=r)]),
        lambda ev, r: ev.ComposedPolicy(policies=(ev.SnapKV(ratio=r), ev.Knorm(ratio=r))), {}),
    "lagkv": (lambda kp, r: kp.LagKVPress(compression_ratio=r),
              lambda ev, r: ev.LagKV(ratio=r), {}),
    "cur": (lambda kp, r: kp.CURPress(compression_ratio=r), lambda ev, r: ev.CUR(ratio=r), {}),
    "non_causal_attn": (lambda kp, r: kp.NonCausalAttnPress(compression_ratio=r),
                        lambda ev, r: ev.NonCausalAttn(ratio=r), {}),
    "entropy_chunkkv_knorm": (
        lambda kp, r: kp.EntropyGatedChunkKVPress(press=kp.KnormPress(compression_ratio=r)),
        lambda ev, r: ev.EntropyGatedChunkKV(base=ev.Knorm(ratio=r)), {}),
    "cap": (lambda kp, r: kp.CapPress(compression_ratio=r), lambda ev, r: ev.CapPress(ratio=r), {}),
    "key_rerotation_knorm": (lambda kp, r: kp.KeyRerotationPress(press=kp.KnormPress(compression_ratio=r)),
                             lambda ev, r: ev.KeyRerotation(base=ev.Knorm(ratio=r)),
                             {"match": "norm", "start": "held"}),
}


# ---- issue 11, s2: ThinK (key channel pruning). The ratio is ThinK's key_channel_compression_ratio (and the
# SnapKV ratio in the composition). kvpress zeroes the pruned channels: its kept channels of a (layer, head) are
# those where some held key is non-zero; its kept tokens are matched back on those channels only.
H11B_PRESSES.update({
    "think": (lambda kp, r: kp.ThinKPress(key_channel_compression_ratio=r),
              lambda ev, r: ev.ThinK(key_channel_compression_ratio=r), {"channels": True}),
    "composed_snapkv_think": (
        lambda kp, r: kp.ComposedPress([kp.SnapKVPress(compression_ratio=r),
                                        kp.ThinKPress(key_channel_compression_ratio=r)]),
        lambda ev, r: ev.ComposedPolicy(policies=(ev.SnapKV(ratio=r), ev.ThinK(key_channel_compression_ratio=r))),
        {"channels": True}),
})


def _prunes_channels(method: str) -> bool:
    return H11B_PRESSES.get(method, (None, None, {}))[2].get("channels", False)
# ---- end of the s2 block


def match_norms(kept: torch.Tensor, full: torch.Tensor) -> tuple[list[int], float]:
    """Like :func:`match_rows` but by L2 norm (RoPE re-rotation changes a key but not its norm)."""
    dist = (kept.double().norm(dim=-1)[:, None] - full.double().norm(dim=-1)[None, :]).abs()
    best = dist.min(dim=1)
    return sorted(best.indices.tolist()), float(best.values.max()) if kept.shape[0] else 0.0
# ---- end of the h11b block


# ---- s1 (issue 11): SimLayerKV and QFilter. SimLayerKV has no ratio: the "ratio" slot carries lazy_threshold.
# Same parameters on both sides ("simlayerkv"): the lazy decisions must agree, and in a lazy layer our window keeps
# the n_last (= 1) token more that kvpress's `-n_recent + n_last` slice leaves out (see simlayerkv.py). With our
# n_recent one smaller ("simlayerkv_r63") a lazy layer keeps exactly kvpress's set (the lazy score then sums one
# token fewer, so a decision could differ only for a layer within that token's attention of the threshold).
# QFilter: kvpress's QFilterPress scoring fed OUR filters (file in $LMC_QFILTER_FILE) instead of the hub's.
S1_RECENT = 64


def _kvpress_qfilter(kp, r):
    from safetensors.torch import load_file

    class FiltersFromFile(kp.QFilterPress):
        def post_init_from_model(self, model):
            self.q_filters = load_file(os.environ["LMC_QFILTER_FILE"])["q_filters"].to(model.dtype)

    return FiltersFromFile(compression_ratio=r)


H11B_PRESSES.update({
    "simlayerkv": (lambda kp, t: kp.SimLayerKVPress(lazy_threshold=t, n_recent=S1_RECENT),
                   lambda ev, t: ev.SimLayerKV(lazy_threshold=t, n_recent=S1_RECENT), {}),
    "simlayerkv_r63": (lambda kp, t: kp.SimLayerKVPress(lazy_threshold=t, n_recent=S1_RECENT),
                       lambda ev, t: ev.SimLayerKV(lazy_threshold=t, n_recent=S1_RECENT - 1), {}),
    "qfilter": (_kvpress_qfilter, lambda ev, r: ev.QFilter(ratio=r, filters=os.environ["LMC_QFILTER_FILE"]), {}),
})


def s1_extra(method: str, mine: dict, theirs: dict, n: int) -> dict:
    """SimLayerKV rows: lazy layers on each side (a layer is lazy when it keeps fewer than all tokens) and the
    heads whose only difference is our window's extra oldest token(s)."""
    if not method.startswith("simlayerkv"):
        return {}
    lazy = [sum(any(len(h) < n for h in layer) for layer in side["kept"]) for side in (mine, theirs)]
    extra = sum(set(hb) <= set(ha) and sorted(set(ha) - set(hb)) == list(range(n - S1_RECENT, n - S1_RECENT + 1))
                for la, lb in zip(mine["kept"], theirs["kept"]) for ha, hb in zip(la, lb))
    return {"lazy_layers_ours": lazy[0], "lazy_layers_kvpress": lazy[1], "heads_differing_by_one_window_token": extra}
# ---- end of the s1 block

def _method_entry(method: str):
    """``((press, policy, kwargs), wrapper prefix or "")``."""
    prefix = next((p for p in WRAPPERS if method.startswith(p)), "")
    base = method.removeprefix(prefix)
    if base not in METHOD_CLASSES:
        allowed = ", ".join([*METHOD_CLASSES, *(f"{p}{m}" for p in WRAPPERS for m in METHOD_CLASSES)])
        raise ValueError(f"method {method!r} is unknown; allowed: {allowed}")
    return METHOD_CLASSES[base], prefix


def kvpress_press(method: str, ratio: float):
    import kvpress

    if method in H11B_PRESSES:
        return H11B_PRESSES[method][0](kvpress, ratio)
    (press_name, _, kwargs), wrapper = _method_entry(method)
    base = method.removeprefix(wrapper)
    press = getattr(kvpress, press_name)(compression_ratio=ratio, **kwargs, **KVPRESS_ONLY_KWARGS.get(base, {}))
    return getattr(kvpress, WRAPPERS[wrapper][0])(press=press) if wrapper else press


def match_rows(kept: torch.Tensor, full: torch.Tensor) -> tuple[list[int], float]:
    """Indices of the rows of ``full: [n, D]`` equal to the rows of ``kept: [k, D]`` (sorted), and the largest
    distance of a match (0 when the gather copied exactly)."""
    dist = torch.cdist(kept.double(), full.double())
    best = dist.min(dim=1)
    return sorted(best.indices.tolist()), float(best.values.max()) if kept.shape[0] else 0.0


def continuation_logits(model, suffix: torch.Tensor, cache, start: int) -> torch.Tensor:
    """``[m, V]`` logits of the continuation fed one token at a time at positions ``start, start + 1, ...``
    (one token per step: kvpress's DynamicCache holds different lengths per layer after PyramidKV, and
    transformers builds a multi-token mask from the first layer's length only)."""
    rows = []
    for i in range(suffix.shape[1]):
        pos = torch.tensor([[start + i]])
        rows.append(model(input_ids=suffix[:, i : i + 1], **cache_kwargs(cache), position_ids=pos).logits[0, -1])
    return torch.stack(rows)


def run_kvpress_side(args: argparse.Namespace) -> None:
    from transformers import AutoModelForCausalLM, DynamicCache

    data = torch.load(args.inputs)
    ids, suffix = data["ids"], data["suffix"]
    n = ids.shape[1]
    models = {}
    full_keys = {}
    out: dict = {"versions": {}, "runs": {}}
    import kvpress
    import transformers

    out["versions"] = {"kvpress": kvpress.__version__ if hasattr(kvpress, "__version__") else "0.5.5",
                       "transformers": transformers.__version__, "torch": str(torch.__version__)}
    for impl in ("sdpa", "eager"):
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation=impl)
        model.eval()
        models[impl] = model
        cache = DynamicCache()
        with torch.no_grad():
            model.model(input_ids=ids, **cache_kwargs(cache))
            full_keys[impl] = [layer.keys[0].clone() for layer in cache.layers]
            base = continuation_logits(model, suffix, cache, n)
        out["runs"][f"baseline_{impl}"] = {"logits": base}
    for method in args.methods:
        for ratio in args.ratios:
            impl = "eager" if method == "observed_attention" else "sdpa"
            model = models[impl]
            press = kvpress_press(method, ratio)
            cache = DynamicCache()
            t0 = time.time()
            with torch.no_grad():
                with press(model):
                    model.model(input_ids=ids, **cache_kwargs(cache))
                kept, worst, channels = [], 0.0, []
                for li, layer in enumerate(cache.layers):
                    heads = []
                    if method.startswith(MASKED):
                        masked = model.model.layers[li].self_attn.masked_key_indices
                        for h in range(layer.keys.shape[1]):
                            drop = set(masked[2][(masked[0] == 0) & (masked[1] == h)].tolist())
                            heads.append([j for j in range(n) if j not in drop])
                    elif _prunes_channels(method):  # ThinK: kept channels = not all zero; match on them
                        chans = []
                        for h in range(layer.keys.shape[1]):
                            ch = (layer.keys[0, h] != 0).any(dim=0).nonzero().squeeze(-1)
                            idx, dist = match_rows(layer.keys[0, h][:, ch], full_keys[impl][li][h][:, ch])
                            heads.append(idx)
                            chans.append(ch.tolist())
                            worst = max(worst, dist)
                        channels.append(chans)
                    else:
                        by_norm = H11B_PRESSES.get(method, (None, None, {}))[2].get("match") == "norm"
                        for h in range(layer.keys.shape[1]):
                            idx, dist = (match_norms if by_norm else match_rows)(layer.keys[0, h],
                                                                                 full_keys[impl][li][h])
                            heads.append(idx)
                            worst = max(worst, dist)
                    kept.append(heads)
                held_start = H11B_PRESSES.get(method, (None, None, {}))[2].get("start") == "held"
                logits = continuation_logits(model, suffix, cache, cache.get_seq_length() if held_start else n)
            out["runs"][f"{method}@{ratio}"] = {"kept": kept, "logits": logits, "match_dist": worst,
                                                "impl": impl, "seconds": time.time() - t0}
            if channels:
                out["runs"][f"{method}@{ratio}"]["channels"] = channels
            print(f"kvpress {method} {ratio}: {time.time() - t0:.1f}s, match distance {worst:.2e}", flush=True)
    torch.save(out, args.result)


# ----------------------------------------------------------------------------------------------- our side


def our_policy(method: str, ratio: float, tok=None):
    from lmcompress.kv import evict

    if method in H11B_PRESSES:
        return H11B_PRESSES[method][1](evict, ratio)
    (_, policy_name, kwargs), wrapper = _method_entry(method)
    extra = dict(OURS_ONLY_KWARGS.get(method.removeprefix(wrapper), {}))
    if extra.get("prefix_tokens") == "chat_prefix":
        extra["prefix_tokens"] = chat_prefix_tokens(tok)
    policy = getattr(evict, policy_name)(ratio=ratio, **kwargs, **extra)
    return getattr(evict, WRAPPERS[wrapper][1])(base=policy) if wrapper else policy


def run_our_side(args: argparse.Namespace, ids: torch.Tensor, suffix: torch.Tensor) -> dict:
    from lmcompress.kv import CompressedCache, KVSpec, scoring_hooks
    from lmcompress.models import load_model

    model, tok = load_model(args.model)
    out: dict = {"runs": {}}
    with torch.no_grad():
        cache = CompressedCache(model, KVSpec())
        model(ids, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
        full_keys = [layer.segments[0].all_tokens()[0][0].clone() for layer in cache.layers]
        out["runs"]["baseline"] = {"logits": continuation_logits(model, suffix, cache, ids.shape[1])}
    for method in args.methods:
        for ratio in args.ratios:
            policy = our_policy(method, ratio, tok)
            cache = CompressedCache(model, KVSpec(evict=policy))
            t0 = time.time()
            with torch.no_grad():
                with scoring_hooks(model, cache, tok):  # KVzip's reconstruction pass runs from its hook
                    model(ids, **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
                # positions of the kept tokens (= their prompt indices); ragged layers are left-padded with -1
                kept = [[[p for p in layer.positions()[0, h].tolist() if p >= 0] for h in range(layer.num_heads)]
                        for layer in cache.layers]
                if H11B_PRESSES.get(method, (None, None, {}))[2].get("match") == "norm":  # re-rotated: positions moved
                    kept = [[match_norms(layer.segments[0].all_tokens()[0][0, h], full_keys[li][h])[0]
                             for h in range(layer.num_heads)] for li, layer in enumerate(cache.layers)]
                logits = continuation_logits(model, suffix, cache, ids.shape[1])
            out["runs"][f"{method}@{ratio}"] = {"kept": kept, "logits": logits, "seconds": time.time() - t0}
            if _prunes_channels(method):
                out["runs"][f"{method}@{ratio}"]["channels"] = [
                    [ch.tolist() for ch in layer.key_channels()[0]] for layer in cache.layers]
            print(f"lmcompress {method} {ratio}: {time.time() - t0:.1f}s", flush=True)
    return out


# ----------------------------------------------------------------------------------------------- compare


def compare(ours: dict, ref: dict, n: int) -> list[dict]:
    rows = []
    for impl in ("sdpa", "eager"):
        theirs = ref["runs"][f"baseline_{impl}"]["logits"]
        rows.append({"method": f"no compression (kvpress side: {impl})", "ratio": 0.0, "kept_per_head": n,
                     "max_abs_logit_diff": float((ours["runs"]["baseline"]["logits"] - theirs).abs().max()),
                     "top1_agree": _top1(ours["runs"]["baseline"]["logits"], theirs)})
    for key, mine in ours["runs"].items():
        if key == "baseline":
            continue
        theirs = ref["runs"][key]
        method, ratio = key.split("@")
        heads = identical = diff_entries = kept_total = 0
        count_mismatch = 0
        for la, lb in zip(mine["kept"], theirs["kept"]):
            for ha, hb in zip(la, lb):
                heads += 1
                sa, sb = set(ha), set(hb)
                identical += sa == sb
                diff_entries += len(sa ^ sb) // 2 if len(sa) == len(sb) else len(sa ^ sb)
                count_mismatch += len(sa) != len(sb)
                kept_total += len(sb)
        la_logits, lb_logits = mine["logits"], theirs["logits"]
        rows.append({
            "method": method, "ratio": float(ratio), "kvpress_attention": theirs["impl"], "heads": heads,
            "identical_heads": identical,
            "differing_entries": diff_entries, "count_mismatch_heads": count_mismatch,
            "kept_per_head": kept_total / heads,
            "max_abs_logit_diff": float((la_logits - lb_logits).abs().max()),
            "next_token_max_abs_diff": float((la_logits[-1] - lb_logits[-1]).abs().max()),
            "top1_agree": _top1(la_logits, lb_logits),
            "kvpress_match_dist": theirs.get("match_dist", 0.0),
            **s1_extra(method, mine, theirs, n),
        })
        if "channels" in mine:  # ThinK: kept key channel sets per (layer, head)
            pairs = [(set(a), set(b)) for la, lb in zip(mine["channels"], theirs["channels"]) for a, b in zip(la, lb)]
            rows[-1]["identical_channel_sets"] = sum(a == b for a, b in pairs)
            rows[-1]["channels_kept_differently"] = sum(len(a ^ b) // 2 for a, b in pairs)
            rows[-1]["kept_channels_per_head"] = sum(len(b) for _, b in pairs) / len(pairs)
    return rows


def _top1(a: torch.Tensor, b: torch.Tensor) -> str:
    return f"{int((a.argmax(-1) == b.argmax(-1)).sum())}/{a.shape[0]}"


def markdown(rows: list[dict]) -> str:
    lines = ["| method | ratio | identical (layer, head) kept sets | entries kept differently | kept/head | "
             "max abs logit diff (continuation) | next-token max abs diff | top-1 agree |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["method"].startswith("no compression"):
            lines.append(f"| {r['method']} | 0 | - | - | {r['kept_per_head']} | {r['max_abs_logit_diff']:.2e} | - | "
                         f"{r['top1_agree']} |")
            continue
        lines.append(
            f"| {r['method']} | {r['ratio']} | {r['identical_heads']}/{r['heads']} | {r['differing_entries']} | "
            f"{r['kept_per_head']:.1f} | {r['max_abs_logit_diff']:.2e} | {r['next_token_max_abs_diff']:.2e} | "
            f"{r['top1_agree']} |"
        )
    channel_rows = [r for r in rows if "identical_channel_sets" in r]
    if channel_rows:
        lines += ["", "| method | ratio | identical (layer, head) kept key channel sets | channels kept differently | "
                  "kept channels/head |", "|---|---|---|---|---|"]
        lines += [f"| {r['method']} | {r['ratio']} | {r['identical_channel_sets']}/{r['heads']} | "
                  f"{r['channels_kept_differently']} | {r['kept_channels_per_head']:.1f} |" for r in channel_rows]
    return "\n".join(lines)


def build_inputs(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import AutoTokenizer

    from lmcompress.eval.text import documents

    tok = AutoTokenizer.from_pretrained(args.model)
    text = "\n\n".join(documents("lee")[: 40])
    ids = tok(text, return_tensors="pt").input_ids[:, : args.tokens]
    if ids.shape[1] < args.tokens:
        raise SystemExit(f"only {ids.shape[1]} tokens of text")
    suffix = tok(SUFFIX_TEXT, return_tensors="pt", add_special_tokens=False).input_ids
    return ids, suffix


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Hugging Face model folder")
    parser.add_argument("--out", default="out/crosscheck")
    parser.add_argument("--kvpress-python", default="/work/venv-kvpress/bin/python")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--ratios", nargs="+", type=float, default=list(RATIOS))
    parser.add_argument("--side", choices=["ours", "kvpress"], default="ours")
    parser.add_argument("--stage", choices=["all", "ours", "compare"], default="all",
                        help="all: run both sides and compare; ours: only run and save our side (ours.pt), e.g. "
                             "in parallel with a running kvpress side; compare: compare saved results")
    parser.add_argument("--inputs", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    torch.set_grad_enabled(False)
    if args.side == "kvpress":
        run_kvpress_side(args)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.stage == "all" or not (out / "inputs.pt").exists():
        ids, suffix = build_inputs(args)
        torch.save({"ids": ids, "suffix": suffix}, out / "inputs.pt")
    data = torch.load(out / "inputs.pt")
    ids, suffix = data["ids"], data["suffix"]
    if args.stage == "all":
        cmd = [args.kvpress_python, __file__, "--side", "kvpress", "--model", args.model,
               "--inputs", str(out / "inputs.pt"), "--result", str(out / "kvpress.pt"),
               "--methods", *args.methods, "--ratios", *map(str, args.ratios)]
        subprocess.run(cmd, check=True)
    if args.stage in ("all", "ours"):
        ours = run_our_side(args, ids, suffix)
        torch.save(ours, out / "ours.pt")
        if args.stage == "ours":
            return
    ours = torch.load(out / "ours.pt")
    ref = torch.load(out / "kvpress.pt", weights_only=False)
    rows = compare(ours, ref, ids.shape[1])
    table = markdown(rows)
    (out / "crosscheck.json").write_text(json.dumps({"rows": rows, "kvpress_versions": ref["versions"],
                                                     "tokens": ids.shape[1], "suffix_tokens": suffix.shape[1]},
                                                    indent=1))
    (out / "crosscheck.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
