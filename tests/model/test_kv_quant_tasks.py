"""Evaluation tasks for KV quantization: QAQ's error metrics and multiple choice by log-likelihood."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
import torch
import torch.nn.functional as F
from random_ids import ids

from lmcompress._compat import cache_kwargs
from lmcompress.errors import LMCompressError, ModelFileError
from lmcompress.eval.kv_bytes import bf16_equivalent_bytes, uncompressed_bf16_bytes
from lmcompress.eval.tasks import kv_error, multiple_choice
from lmcompress.kv import KVSpec, SnapKV
from lmcompress.kv.quant import KIVI, IntKV
from lmcompress.registry import TASKS

pytestmark = pytest.mark.model  # fixtures `model` and no-grad: conftest.py


def fresh(spec: KVSpec):
    return multiple_choice.new_compressed_cache(spec)


def test_tasks_registered():
    assert "kv_error" in TASKS and "multiple_choice" in TASKS


def test_kv_error_is_zero_without_compression(model):
    res = kv_error.kv_error_sample(model, KVSpec(), ids(48), context=40)
    assert res["logit_kl"] == pytest.approx(0, abs=1e-9)
    assert res["top1_agreement"] == 1.0
    assert all(e["key_rel"] == 0 and e["value_rel"] == 0 and e["attn_out_rel"] == 0 for e in res["layers"])
    assert res["ratio_bf16"] == pytest.approx(1.0)


def test_kv_error_grows_as_bits_shrink(model):
    res8 = kv_error.kv_error_sample(model, KVSpec(quant=IntKV(bits=8, group_size=16)), ids(48), context=40)
    res2 = kv_error.kv_error_sample(model, KVSpec(quant=IntKV(bits=2, group_size=16)), ids(48), context=40)
    for key in ("key_rel", "value_rel", "attn_out_rel"):
        assert 0 < res8["layers"][0][key] < res2["layers"][0][key]
    assert res8["logit_kl"] < res2["logit_kl"] and res2["logit_kl"] > 1e-6
    assert res2["ratio_bf16"] > res8["ratio_bf16"] > 1
    summary = kv_error.summarize([res2, res2])
    assert summary["samples"] == 2 and summary["logit_kl"] == pytest.approx(res2["logit_kl"])


def test_kv_error_compares_kept_positions_after_eviction(model):
    spec = KVSpec(evict=SnapKV(ratio=0.5, window_size=8))
    res = kv_error.kv_error_sample(model, spec, ids(48), context=40)
    assert res["layers"][0]["held"] == 20
    assert res["layers"][0]["key_rel"] == pytest.approx(0, abs=1e-12)  # eviction alone keeps states exact
    assert res["logit_kl"] > 0


def test_bf16_equivalent_bytes_halves_float32(model):
    from lmcompress.kv import CompressedCache

    cache = CompressedCache(model, KVSpec(quant=KIVI(bits=2, group_size=8, residual=16)))
    model(ids(40), **cache_kwargs(cache))
    fp32 = sum(t.numel() * 4 for t in cache.tensors() if t.dtype == torch.float32)
    assert fp32 > 0
    assert bf16_equivalent_bytes(cache.tensors()) == cache.nbytes - fp32 // 2
    assert uncompressed_bf16_bytes(model, 40) == 4 * 2 * 2 * 16 * 40 * 2  # layers, K/V, heads, dims, tokens


def test_choice_log_likelihoods_match_a_plain_forward(model):
    prompt = ids(12)
    choices = [[5, 6, 7], [9], [30, 31]]
    sums, means, (nbytes, _) = multiple_choice.choice_log_likelihoods(model, fresh(KVSpec()), prompt, choices)
    for i, c in enumerate(choices):
        full = torch.cat([prompt, torch.tensor([c])], dim=1)
        logp = F.log_softmax(model(full).logits[0].float(), -1)
        expected = sum(float(logp[11 + j, t]) for j, t in enumerate(c))
        assert float(sums[i]) == pytest.approx(expected, abs=1e-4)
        assert float(means[i]) == pytest.approx(expected / len(c), abs=1e-4)
    assert nbytes > 0


def test_choices_are_scored_against_the_compressed_prompt(model):
    prompt = ids(40)
    choices = [[5, 6, 7], [9, 10]]
    exact, _, (full_bytes, _) = multiple_choice.choice_log_likelihoods(model, fresh(KVSpec()), prompt, choices)
    quant, _, (nbytes, _) = multiple_choice.choice_log_likelihoods(
        model, fresh(KVSpec(quant=IntKV(bits=2, group_size=16))), prompt, choices)
    assert not torch.allclose(exact, quant)
    assert nbytes < full_bytes / 4


def test_choices_split_like_running_text():
    class Tok:
        def __call__(self, text, return_tensors=None, add_special_tokens=True):
            ids = [ord(c) for c in text]
            return type("E", (), {"input_ids": torch.tensor([ids]) if return_tensors else ids})()

    prompt_ids, choice_ids = multiple_choice.encode_choices(Tok(), "Q: x\nA: ", ("four", " two"))
    assert prompt_ids[0].tolist() == [ord(c) for c in "Q: x\nA:"]
    assert choice_ids == [[ord(c) for c in " four"], [ord(c) for c in " two"]]


def fake_bigbench(folder, tasks: dict) -> None:
    with tarfile.open(folder / multiple_choice.SDIST, "w:gz") as tar:
        for name, task in tasks.items():
            data = json.dumps(task).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{name}/task.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_bigbench_questions_are_read_from_the_sdist(tmp_path):
    task = {"name": "toy", "examples": [
        {"input": "How many legs do horses have?", "target_scores": {"two": 0, "four": 1}},
        {"input": "No scores here", "target": "x"},
    ]}
    fake_bigbench(tmp_path, {"toy": task})
    questions = multiple_choice.bigbench_questions("toy", folder=str(tmp_path))
    assert len(questions) == 1
    q = questions[0]
    assert q.prompt == "Question: How many legs do horses have?\nAnswer:"
    assert q.choices == ("two", "four") and q.answer == 1
    with pytest.raises(LMCompressError, match="no JSON task"):
        multiple_choice.bigbench_task("missing", str(tmp_path))
    with pytest.raises(ModelFileError, match=r"pip download --no-deps bigbench==1\.0\.0"):
        multiple_choice.bigbench_task("toy", str(tmp_path / "nowhere"))


def test_few_shot_prompts_prepend_solved_examples_not_asked(tmp_path):
    task = {"name": "toy", "examples": [
        {"input": "No scores here", "target": "x"},
        {"input": "Horse legs?", "target_scores": {"two": 0, "four": 1}},
        {"input": "Bird legs?", "target_scores": {"two": 1, "four": 0}},
        {"input": "Ant legs?", "target_scores": {"six": 1, "eight": 0}},
    ]}
    fake_bigbench(tmp_path, {"toy": task})
    questions = multiple_choice.bigbench_questions("toy", folder=str(tmp_path), shots=2)
    assert [q.answer for q in questions] == [0]
    assert questions[0].prompt == ("Question: Horse legs?\nAnswer: four\n\nQuestion: Bird legs?\nAnswer: two\n\n"
                                   "Question: Ant legs?\nAnswer:")
    assert len(multiple_choice.bigbench_questions("toy", folder=str(tmp_path), shots=0)) == 3
    with pytest.raises(LMCompressError, match=r"shots=3 leaves no question .* allowed: 0 <= shots < 3"):
        multiple_choice.bigbench_questions("toy", folder=str(tmp_path), shots=3)
    with pytest.raises(LMCompressError, match="shots"):
        multiple_choice.MultipleChoice(shots=-1)
