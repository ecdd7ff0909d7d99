"""KVzap: training data are KVzip+'s own scores, the linear fit is the least-squares solution, save/load round
trip, scores = the surrogate on the attention inputs, the threshold wrapper frees what scores low, clear errors
for missing files and a surrogate made for another model."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from lmcompress._compat import cache_kwargs
from lmcompress.errors import LMCompressError
from lmcompress.kv import CompressedCache, KVSpec, scoring_hooks
from lmcompress.kv.evict import KVzap, KVzipPlus, ThresholdEviction
from lmcompress.kv.evict.calibration_files import model_identity
from lmcompress.kv.evict.kvzap import load_surrogate, save_surrogate
from lmcompress.kv.evict.kvzap_train import collect, fit, quality
from lmcompress.models import tiny_model

pytestmark = pytest.mark.model

N = 32


def _samples(k: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (1, N), generator=g) for _ in range(k)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    model = tiny_model("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no tokenizer: the chunks are re-fed without instruction
        data = collect(model, None, _samples(4, 0))
        held = collect(model, None, _samples(2, 1))
    folder = tmp_path_factory.mktemp("kvzap")
    paths = {}
    for kind in ("linear", "mlp"):
        sur = fit(*data, kind, hidden_dim=16, steps=50)
        paths[kind] = save_surrogate(folder / f"{kind}.safetensors", sur, model_identity(model),
                                     {"held_out": quality(sur, *held)})
    return model, data, paths


def test_targets_are_kvzip_plus_scores(trained):
    model, (xs, ys), _ = trained
    ids = _samples(4, 0)[0]
    policy = KVzipPlus(ratio=0.5)
    cache = CompressedCache(model, KVSpec(evict=policy))
    captured = {}
    orig = KVzipPlus.context_keep

    def spy(self, scores, num_layers):
        captured.update({k: v.clone() for k, v in scores.items()})
        return orig(self, scores, num_layers)

    KVzipPlus.context_keep = spy
    try:
        with warnings.catch_warnings(), torch.no_grad(), scoring_hooks(model, cache):
            warnings.simplefilter("ignore")
            model(ids, **cache_kwargs(cache), use_cache=True)
    finally:
        KVzipPlus.context_keep = orig
    for li, y in enumerate(ys):  # the first sample's rows, sinks left out
        expected = captured[li][0, :, 4:].T.clamp_min(1e-12).log()
        torch.testing.assert_close(y[: N - 4], expected)
    assert xs[0].shape == (4 * (N - 4), model.config.hidden_size)


def test_linear_fit_is_least_squares(trained):
    _, (xs, ys), paths = trained
    sur, doc = load_surrogate(str(paths["linear"]))
    assert doc["type"] == "linear" and doc["model"]["geometry"][0] == 4
    x, y = xs[0].double(), ys[0].double()
    xa = torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)
    reg = 1e-3 * x.shape[0] * torch.eye(xa.shape[1], dtype=torch.float64)
    reg[-1, -1] = 0
    w = torch.linalg.solve(xa.T @ xa + reg, xa.T @ y)
    torch.testing.assert_close(sur.predict(0, xs[0][None])[0].T.double(), xa @ w, rtol=1e-3, atol=1e-3)
    q = json.loads((paths["linear"].parent / "linear.safetensors.json").read_text())["held_out"]
    assert -10 < q["r2_pooled"] <= 1 and -1 <= q["spearman_pooled"] <= 1


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_kvzap_scores_and_threshold_wrapper(trained, kind):
    model, _, paths = trained
    sur, _ = load_surrogate(str(paths[kind]))
    ids = _samples(1, 7)[0]
    cache = CompressedCache(model, KVSpec(evict=KVzap(ratio=0.5, surrogate=str(paths[kind]))))
    seen = {}

    def hook(mod, args, kwargs, _seen=seen):
        _seen[mod.layer_idx] = kwargs["hidden_states"].clone()

    handles = [layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True) for layer in model.model.layers]
    with torch.no_grad(), scoring_hooks(model, cache):
        model(ids, **cache_kwargs(cache), use_cache=True)
    for h in handles:
        h.remove()
    keep = N - N // 2
    for li, layer in enumerate(cache.layers):
        with torch.no_grad():
            pred = sur.predict(li, seen[li])  # [1, Hkv, N]
        expected = pred.topk(keep, dim=-1).indices.sort(-1).values
        assert torch.equal(layer.positions().long(), expected)
    # threshold wrapper: tokens older than the window with a predicted score below the threshold are freed
    with torch.no_grad():
        thr = float(torch.cat([sur.predict(li, seen[li]).flatten() for li in range(4)]).median())
    cache = CompressedCache(model, KVSpec(evict=ThresholdEviction(base=KVzap(surrogate=str(paths[kind])),
                                                                  threshold=thr, window=8)))
    with torch.no_grad(), scoring_hooks(model, cache):
        model(ids, **cache_kwargs(cache), use_cache=True)
        for _ in range(2):
            model(torch.tensor([[9]]), **cache_kwargs(cache), use_cache=True)
    for li, layer in enumerate(cache.layers):
        with torch.no_grad():
            pred = sur.predict(li, seen[li])[0]  # [Hkv, N]
        old = torch.arange(N) < N + 2 - 8
        for h in range(layer.num_heads):
            held = {p for p in layer.positions()[0, h].tolist() if p >= 0 and p < N}
            assert held == {j for j in range(N) if not (old[j] and pred[h, j] < thr)}
    assert cache.nbytes == sum(t.numel() * t.element_size() for t in cache.tensors())


def test_kvzap_errors(trained, tmp_path):
    _, _, paths = trained
    with pytest.raises(LMCompressError, match="needs surrogate=PATH"):
        KVzap(ratio=0.5)
    with pytest.raises(LMCompressError, match="does not exist"):
        KVzap(surrogate=str(tmp_path / "none.safetensors"))
    (tmp_path / "w.safetensors").write_bytes(paths["linear"].read_bytes())
    with pytest.raises(LMCompressError, match="does not exist"):  # its JSON is missing
        KVzap(surrogate=str(tmp_path / "w.safetensors"))
    other = tiny_model("llama", seed=2)
    cache = CompressedCache(other, KVSpec(evict=KVzap(ratio=0.5, surrogate=str(paths["linear"]))))
    with pytest.raises(LMCompressError, match="made for another model"), torch.no_grad(), \
            scoring_hooks(other, cache):
        other(_samples(1, 3)[0], **cache_kwargs(cache), use_cache=True)
    with pytest.raises(LMCompressError, match=r"threshold=.*must be a number"):
        ThresholdEviction(base=KVzap(surrogate=str(paths["linear"])), threshold="low")
