import torch

from lmcompress.kv.buffers import TokenBuffer, gather_tokens


def test_append_grows_and_keeps_contents():
    first = torch.randn(1, 2, 3, 4)
    buf = TokenBuffer(first)
    assert buf.capacity == 3 and buf.nbytes == first.numel() * 4
    chunks = [first] + [torch.randn(1, 2, k, 4) for k in (1, 5, 40)]
    for c in chunks[1:]:
        buf.append(c)
    assert torch.equal(buf.view(), torch.cat(chunks, dim=2))
    assert buf.capacity >= buf.length == 49
    assert buf.nbytes == buf.data.numel() * 4 == buf.data.untyped_storage().nbytes()


def test_headroom_avoids_reallocation():
    buf = TokenBuffer(torch.randn(1, 1, 10, 2), headroom=5)
    ptr = buf.data.data_ptr()
    for _ in range(5):
        buf.append(torch.randn(1, 1, 1, 2))
    assert buf.data.data_ptr() == ptr and buf.capacity == 15


def test_gather_keeps_per_head_indices_and_frees():
    x = torch.arange(2 * 3 * 6 * 2, dtype=torch.float32).reshape(2, 3, 6, 2)
    buf = TokenBuffer(x, headroom=10)
    idx = torch.tensor([[[0, 2], [1, 5], [3, 4]], [[5, 0], [2, 2], [1, 3]]])
    buf.gather(idx)
    assert buf.capacity == 2 and buf.length == 2
    assert torch.equal(buf.view(), gather_tokens(x, idx))
    assert torch.equal(buf.view()[1, 0, 0], x[1, 0, 5])


def test_truncate_front_keeps_the_last_tokens():
    x = torch.randn(1, 2, 9, 3)
    buf = TokenBuffer(x)
    buf.truncate_front(4)
    assert torch.equal(buf.view(), x[:, :, 5:]) and buf.capacity == 4
