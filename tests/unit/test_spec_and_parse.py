import pytest

from lmcompress.errors import LMCompressError
from lmcompress.kv import IntKV, KVSpec, SnapKV, StreamingLLM
from lmcompress.kv.parse import has_eviction, parse_method


def test_spec_round_trips_and_hashes_stably():
    spec = KVSpec(evict=SnapKV(ratio=0.5, window_size=32), quant=IntKV(bits=2, group_size=32))
    again = KVSpec.from_dict(spec.to_dict())
    assert again == spec and hash(again) == hash(spec)
    assert again.key() == spec.key()
    assert spec.key() != KVSpec(evict=SnapKV(ratio=0.5)).key()
    assert spec.label() == "snapkv(ratio=0.5, window_size=32)+int(bits=2, group_size=32)"
    assert KVSpec(quant=IntKV()).label() == "int(bits=4)"
    assert KVSpec(evict=SnapKV(budget=64)).label() == "snapkv(budget=64)"
    assert KVSpec().label() == "none" and KVSpec().is_identity


def test_parse_method_forms():
    assert parse_method("none") == KVSpec()
    assert parse_method("snapkv", ratio=0.75) == KVSpec(evict=SnapKV(ratio=0.75))
    assert parse_method("streaming_llm:n_sink=8", budget=100) == KVSpec(evict=StreamingLLM(budget=100, n_sink=8))
    assert parse_method("int4") == KVSpec(quant=IntKV(bits=4))
    assert parse_method("snapkv+int:bits=2,group_size=32", ratio=0.5) == KVSpec(
        evict=SnapKV(ratio=0.5), quant=IntKV(bits=2, group_size=32))
    assert has_eviction("snapkv+int4") and not has_eviction("int8")


@pytest.mark.parametrize(("text", "match"), [
    ("foo", "unknown method 'foo'"),
    ("int9", "bits=9 is not supported"),
    ("snapkv:window=3", "bad arguments"),
    ("snapkv+streaming_llm", "two eviction methods"),
    ("snapkv:ratio", "not key=value"),
])
def test_parse_errors(text, match):
    with pytest.raises(LMCompressError, match=match):
        parse_method(text, ratio=0.5)


def test_spec_rejects_wrong_types():
    with pytest.raises(LMCompressError, match="not an eviction policy"):
        KVSpec(evict="snapkv")


def test_parse_wrappers_with_a_base():
    from lmcompress.kv.evict import AdaKV, DecodingCompression, Knorm

    assert parse_method("adakv:base=snapkv", ratio=0.5) == KVSpec(evict=AdaKV(base=SnapKV(ratio=0.5)))
    spec = parse_method("decoding:base=knorm,interval=64,target_size=512,base.ratio=0.25", ratio=0.9)
    assert spec == KVSpec(evict=DecodingCompression(base=Knorm(ratio=0.25), interval=64, target_size=512))
    assert parse_method("adakv:base=snapkv,base.window_size=32", budget=100).evict.base == SnapKV(
        budget=100, window_size=32)
    with pytest.raises(LMCompressError, match="base='nope'"):
        parse_method("adakv:base=nope", ratio=0.5)
