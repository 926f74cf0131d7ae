"""chunk_causal_attention (the CP chunk's attention on the CPU) and sliding_window_attention (the
scoring pass on the CPU) against a float64 softmax written here from the definition: forward and
backward, and what is kept for the backward pass."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from megatron_tw.model.chunk_attention import chunk_causal_attention, sliding_window_attention

pytestmark = pytest.mark.unit


def reference(q, k, v, scale):
    """float64: query i of the chunk sits at position end - c + i and sees keys 0 .. that."""
    q, k, v = (t.double() for t in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    c, end = q.shape[2], k.shape[2]
    scores = q @ k.transpose(-1, -2) * scale
    hidden = torch.arange(end)[None, :] > torch.arange(end - c, end)[:, None]
    return scores.masked_fill(hidden, float("-inf")).softmax(-1) @ v


def layout(b, n, ng, c, end, h, dtype, seed):
    """Tensors as the CP attention passes them: [s, b, n, h] storage permuted to [b, n, s, h],
    then sliced (non-contiguous views)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2 * c, b, n, h, generator=g).to(dtype).permute(1, 2, 0, 3)[:, :, c:]
    k = torch.randn(end + 3, b, ng, h, generator=g).to(dtype).permute(1, 2, 0, 3)[:, :, :end]
    v = torch.randn(end + 3, b, ng, h, generator=g).to(dtype).permute(1, 2, 0, 3)[:, :, :end]
    return [t.detach().requires_grad_() for t in (q, k, v)]


@pytest.mark.parametrize("c,end", [(8, 8), (8, 24), (5, 6), (16, 64)])
@pytest.mark.parametrize("n,ng", [(4, 4), (4, 2), (6, 1)])
def test_forward_and_backward_equal_the_float64_softmax(c, end, n, ng):
    q, k, v = layout(2, n, ng, c, end, 16, torch.float32, seed=c * end + n + ng)
    grad_out = torch.randn(2, n, c, 16, generator=torch.Generator().manual_seed(1))
    out = chunk_causal_attention(q, k, v, scale=0.3)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference(q64, k64, v64, 0.3)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad_out.double())
    assert out.shape == (2, n, c, 16) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for got, want, name in zip(grads, ref_grads, "qkv"):
        assert got.shape == want.shape, name
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, msg=f"d{name}")


def test_bfloat16_stays_close_to_the_reference():
    q, k, v = layout(1, 4, 2, 16, 48, 32, torch.bfloat16, seed=3)
    out = chunk_causal_attention(q, k, v, scale=32 ** -0.5)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), reference(q, k, v, 32 ** -0.5), rtol=2e-2, atol=2e-2)


def test_equals_sdpa_with_the_lower_right_causal_bias():
    q, k, v = layout(2, 4, 2, 12, 40, 8, torch.float32, seed=5)
    ours = chunk_causal_attention(q, k, v, scale=0.5)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(12, 40),
                                          scale=0.5, enable_gqa=True)
    torch.testing.assert_close(ours, sdpa, rtol=1e-5, atol=1e-6)


def test_nothing_quadratic_is_kept_for_the_backward_pass():
    """SDPA with the lower-right bias on the CPU keeps a dense [c, end] mask; this path keeps
    q, k, v, the output and the log-sum-exp only."""
    c, end = 256, 1024
    q, k, v = layout(1, 2, 2, c, end, 4, torch.float32, seed=7)

    def saved(fn):
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(q, k, v)
        return sizes

    ours = saved(lambda q, k, v: chunk_causal_attention(q, k, v, scale=0.5))
    dense = saved(lambda q, k, v: F.scaled_dot_product_attention(
        q, k, v, attn_mask=causal_lower_right(c, end), scale=0.5))
    assert max(dense) >= c * end  # the check can see a dense mask when one is kept
    assert max(ours) < c * end / 16, ours


def window_reference(q, k, v, start, left, scale, sink=False):
    """float64: query i at position start + i sees keys start + i - left .. start + i, and with
    ``sink`` key 0 as well."""
    q, k, v = (t.double() for t in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    qp = torch.arange(start, start + q.shape[2])[:, None]
    kp = torch.arange(k.shape[2])[None, :]
    hidden = (kp > qp) | (kp < qp - left)
    if sink:
        hidden &= kp != 0
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(hidden, float("-inf"))
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("start,c,s,left", [
    (0, 32, 32, 8),     # one chunk, whole sequence, several query blocks
    (0, 32, 32, 5),     # blocks that do not divide the chunk
    (16, 8, 40, 4),     # a CP chunk in the middle, keys beyond it
    (24, 16, 40, 100),  # a window longer than the sequence: plain causal
    (8, 8, 16, 0),      # a window of one token: each query sees itself
    (10, 12, 22, 11),
])
@pytest.mark.parametrize("n,ng", [(4, 4), (4, 2)])
@pytest.mark.parametrize("sink", [False, True], ids=["no-sink", "sink"])
def test_sliding_window_equals_the_float64_softmax(start, c, s, left, n, ng, sink):
    g = torch.Generator().manual_seed(start + c + s + left + ng)
    q = torch.randn(c, 2, n, 16, generator=g).permute(1, 2, 0, 3)
    k = torch.randn(s, 2, ng, 16, generator=g).permute(1, 2, 0, 3)
    v = torch.randn(s, 2, ng, 16, generator=g).permute(1, 2, 0, 3)
    out = sliding_window_attention(q, k, v, start=start, left=left, scale=0.25, sink=sink)
    assert out.shape == (2, n, c, 16)
    torch.testing.assert_close(out.double(), window_reference(q, k, v, start, left, 0.25, sink),
                               rtol=1e-5, atol=1e-5)


def test_the_sink_changes_what_a_far_query_sees():
    """Beyond the window the sink is a real difference (the check above can tell them apart)."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 32, 8, generator=g) for _ in range(3))
    with_sink = sliding_window_attention(q, k, v, start=0, left=4, scale=0.5, sink=True)
    without = sliding_window_attention(q, k, v, start=0, left=4, scale=0.5)
    assert torch.equal(with_sink[:, :, :5], without[:, :, :5])  # key 0 is in their window
    assert (with_sink[:, :, 5:] - without[:, :, 5:]).abs().amax() > 1e-3


def test_sliding_window_in_bfloat16():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 64, 32, generator=g).to(torch.bfloat16) for _ in range(3))
    out = sliding_window_attention(q, k, v, start=0, left=16, scale=32 ** -0.5)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), window_reference(q, k, v, 0, 16, 32 ** -0.5),
                               rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_query_runs_are_the_load_balanced_positions(cp):
    """The CP attention's integer (local, global) runs name the positions the batch split gives
    each rank."""
    from megatron_tw.data.cp_layout import load_balanced_positions
    from megatron_tw.data.cp_layout import query_runs as _query_runs

    for rank in range(cp):
        sq = 48 // cp
        positions = load_balanced_positions(sq, cp, rank) if cp > 1 else torch.arange(sq)
        runs = _query_runs(sq, cp, rank)
        assert [a for a, _, _ in runs][0] == 0 and runs[-1][1] == sq
        for a, e, start in runs:
            assert positions[a:e].tolist() == list(range(start, start + e - a)), (rank, a)
