"""QFilter: the filter rule on hand-built queries (sign, GQA mean), the calibration against queries rebuilt by
hand (q_proj + RoPE), exact kept indices on hand-built keys and on a model, the safetensors + JSON round trip,
and clear errors for a missing, foreign, altered or mismatched file (also through both CLIs: exit 2, one line)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from lmcompress._compat import cache_kwargs
from lmcompress.cli import main
from lmcompress.errors import LMCompressError
from lmcompress.kv import CompressedCache, KVSpec
from lmcompress.kv.evict import QFilter, ScoreInputs
from lmcompress.kv.evict.calibration_files import model_identity
from lmcompress.kv.evict.qfilter import load_filters, save_filters
from lmcompress.kv.evict.qfilter_calibration import compute_filters, filters_from_queries
from lmcompress.kv.evict.qfilter_calibration import main as calibration_main
from lmcompress.models import tiny_model

pytestmark = pytest.mark.model


def _samples(k: int = 2, n: int = 24, seed: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (1, n), generator=g) for _ in range(k)]


def test_filter_rule_on_rank_one_queries():
    d = 4
    e = torch.eye(d)
    c = torch.tensor([1.0, 2.0, 0.5, 1.5, 3.0, 1.0, 2.0, -1.0, -0.5, -2.0])  # 7 of 10 positive
    heads = [c[:, None] * e[0], 2 * c[:, None] * e[0],  # group 0: mostly along +e0
             c[:, None] * e[1], -c[:, None] * e[2]]  # group 1: mostly +e1, mostly -e2
    queries = torch.stack(heads)  # [Hq=4, N, D]
    f = filters_from_queries(queries, num_kv_heads=2)
    # each head's filter is -(the direction most queries point to); a KV head averages its group
    torch.testing.assert_close(f, torch.stack([-e[0], (-e[1] + e[2]) / 2]), atol=1e-6, rtol=0)
    # the score -<f, k> is highest for keys along the queries' direction
    keys = torch.stack([e[0], -e[0], e[3]])
    assert (-(keys @ f[0])).argmax() == 0


def _hand_queries(model, ids) -> list[torch.Tensor]:
    """Per layer ``[Hq, n, D]`` post-RoPE queries rebuilt from q_proj and the rotary table (Llama)."""
    cfg = model.config
    hq, d = cfg.num_attention_heads, cfg.head_dim
    seen = {}

    def hook(mod, args, kwargs):
        seen[mod.layer_idx] = kwargs["hidden_states"]

    handles = [layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True) for layer in model.model.layers]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    out = []
    pos = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        for li, layer in enumerate(model.model.layers):
            h = seen[li]
            q = layer.self_attn.q_proj(h).view(1, -1, hq, d).transpose(1, 2)
            cos, sin = model.model.rotary_emb(h, pos)
            q, _ = apply_rotary_pos_emb(q, q, cos, sin)
            out.append(q[0])
    return out


@pytest.mark.parametrize("svd_samples", [1000, 17])
def test_calibration_matches_hand_computation(svd_samples):
    model = tiny_model("llama")
    samples = _samples()
    hand = [_hand_queries(model, ids) for ids in samples]  # [sample][layer] -> [Hq, n, D]
    total = sum(s.shape[1] for s in samples)
    chosen = torch.randperm(total, generator=torch.Generator().manual_seed(0))[: min(svd_samples, total)]
    expected = []
    for li in range(4):
        allq = torch.cat([h[li] for h in hand], dim=1)  # [Hq, total, D], tokens in sample order
        expected.append(filters_from_queries(allq[:, chosen.sort().values], 2))
    got = compute_filters(model, samples, svd_samples, seed=0)
    assert got.shape == (4, 2, 16)
    torch.testing.assert_close(got, torch.stack(expected), atol=1e-5, rtol=1e-4)


def test_kept_indices_on_hand_built_keys(tmp_path):
    model = tiny_model("llama")  # 4 layers, 2 KV heads, head_dim 16
    filters = torch.zeros(4, 2, 16)
    filters[:, 0, 0] = -1.0  # head 0: score = k[0]
    filters[:, 1, 1] = 1.0  # head 1: score = -k[1]
    path = save_filters(tmp_path / "f.safetensors", filters, model_identity(model), {})
    policy = QFilter(ratio=0.5, filters=str(path))
    n = 8
    keys = torch.zeros(1, 2, n, 16)
    keys[0, 0, :, 0] = torch.tensor([0.3, -1.0, 2.0, 0.1, 5.0, -3.0, 0.0, 1.0])
    keys[0, 1, :, 1] = torch.tensor([0.3, -1.0, 2.0, 0.1, 5.0, -3.0, 0.0, 1.0])
    inputs = ScoreInputs(keys=keys, values=torch.zeros_like(keys), queries=torch.zeros(1, 4, 1, 16),
                         positions=torch.arange(n).expand(1, 2, n), scaling=0.25, layer_idx=2, num_layers=4)
    assert policy.select(inputs).tolist() == [[[0, 2, 4, 7], [1, 3, 5, 6]]]


def test_model_keeps_top_scores_and_frees_the_rest(tmp_path):
    model = tiny_model("qwen3")  # keys pass k_norm before RoPE
    path = save_filters(tmp_path / "f.safetensors", compute_filters(model, _samples()), model_identity(model), {})
    policy = QFilter(ratio=0.75, filters=str(path))
    ids = _samples(1, 40, seed=9)[0]
    full = CompressedCache(model, KVSpec())
    cache = CompressedCache(model, KVSpec(evict=policy))
    with torch.no_grad():
        model(ids, **cache_kwargs(full), use_cache=True)
        model(ids, **cache_kwargs(cache), use_cache=True)
    keep = 40 - math.floor(0.75 * 40)
    for li, layer in enumerate(cache.layers):
        keys = full.layers[li].segments[0].all_tokens()[0].float()  # [1, Hkv, 40, D]
        scores = -torch.einsum("bhnd,hd->bhn", keys, policy.filter_tensor[li])
        expected = scores.topk(keep, dim=-1).indices.sort(dim=-1).values
        assert torch.equal(layer.positions().long(), expected)
        assert layer.nbytes == 2 * keep * (2 * 16 * 4 + 4)  # 2 KV heads x (K + V fp32 + int32 position)
    assert cache.nbytes == sum(t.numel() * t.element_size() for t in cache.tensors())


def test_round_trip_same_scores(tmp_path):
    model = tiny_model("llama")
    filters = compute_filters(model, _samples())
    path = save_filters(tmp_path / "f.safetensors", filters, model_identity(model), {"calibration": {"x": 1}})
    loaded, doc = load_filters(str(path))
    assert torch.equal(loaded, filters)
    assert doc["shape"] == [4, 2, 16] and doc["kv_heads"] == 2 and doc["model"]["geometry"] == [4, 4, 2, 16]
    ids = _samples(1, 30, seed=4)[0]
    kept = []
    for _ in range(2):  # two policies loaded from the file keep the same entries
        cache = CompressedCache(model, KVSpec(evict=QFilter(ratio=0.5, filters=str(path))))
        with torch.no_grad():
            model(ids, **cache_kwargs(cache), use_cache=True)
        kept.append([layer.positions().clone() for layer in cache.layers])
    assert all(torch.equal(a, b) for a, b in zip(*kept))


def test_file_errors(tmp_path):
    model = tiny_model("llama")
    path = save_filters(tmp_path / "f.safetensors", compute_filters(model, _samples()), model_identity(model), {})
    with pytest.raises(LMCompressError, match="needs filters=PATH"):
        QFilter(ratio=0.5)
    with pytest.raises(LMCompressError, match=r"'/nonexistent/q\.safetensors' does not exist"):
        QFilter(ratio=0.5, filters="/nonexistent/q.safetensors")
    lonely = tmp_path / "lonely.safetensors"
    lonely.write_bytes(path.read_bytes())
    with pytest.raises(LMCompressError, match=r"lonely\.safetensors\.json' does not exist"):
        QFilter(filters=str(lonely))
    other_kind = tmp_path / "k.safetensors"
    other_kind.write_bytes(path.read_bytes())
    (tmp_path / "k.safetensors.json").write_text(json.dumps({"kind": "kvzap_surrogate"}))
    with pytest.raises(LMCompressError, match="is not a qfilter_filters file"):
        QFilter(filters=str(other_kind))
    altered = tmp_path / "a.safetensors"
    save_filters(altered, torch.zeros(4, 2, 16), model_identity(model), {})
    altered.write_bytes(path.read_bytes())  # weights of another calibration under this JSON
    with pytest.raises(LMCompressError, match=r"does not match its .*SHA-256 differs"):
        QFilter(filters=str(altered))
    for other in (tiny_model("llama", seed=1), tiny_model("gemma3")):  # other weights / another architecture
        cache = CompressedCache(other, KVSpec(evict=QFilter(ratio=0.5, filters=str(path))))
        with pytest.raises(LMCompressError, match=r"made for another model|layers; this model has"), \
                torch.no_grad():
            other(torch.randint(3, 256, (1, 20)), **cache_kwargs(cache), use_cache=True)
    with pytest.raises(LMCompressError, match=r"ratio=1\.0 is out of range"):
        QFilter(ratio=1.0, filters=str(path))


def test_cli_errors_exit_2_one_line(tmp_path, capsys):
    for method, needle in (("qfilter", "QFilter needs filters=PATH"),
                           ("qfilter:filters=/nonexistent/q.safetensors",
                            "QFilter filters file '/nonexistent/q.safetensors' does not exist")):
        assert main(["bench", "--methods", method, "--no-ppl", "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("lmcompress: error: ") and needle in err[0], err
    assert calibration_main(["--model", "tiny-llama", "--out", str(tmp_path / "q.safetensors"),
                             "--num-sequences", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["qfilter_calibration: error: num_sequences=0 is not allowed; it must be an integer >= 1"]
    assert not (tmp_path / "q.safetensors").exists()


def test_methods_json_lists_qfilter(capsys):
    assert main(["methods", "--json"]) == 0
    eviction = json.loads(capsys.readouterr().out)["eviction"]
    assert "filters" in eviction["qfilter"]["params"]
    assert {"lazy_threshold", "n_last", "n_recent", "n_initial"} <= set(eviction["simlayerkv"]["params"])
