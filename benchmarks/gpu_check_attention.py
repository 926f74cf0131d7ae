#!/usr/bin/env python
"""The attention section of benchmarks/gpu_check.py: the project's attention kernels against a
float64 reference, with their time and peak memory.

    python benchmarks/gpu_check_attention.py --device cuda --lengths 16384,32768 --out cases.jsonl

Cases, for every sequence length s (batch 1, --heads query heads sharing --kv-groups K/V heads,
head size --head-dim, bf16 inputs drawn from N(0, 1), softmax scale head_dim^-1/2):

  chunk_causal  megatron_tw.model.chunk_attention.chunk_causal_attention, the queries of the last
                half of the sequence (positions s/2 .. s-1, a context-parallel rank's chunk) over
                the keys 0 .. s-1, causal aligned lower-right; forward and backward.
  sliding sink  megatron_tw.model.chunk_attention.sliding_window_attention over the whole
  sliding       sequence with a window of W tokens as the sliding-mode scorer sets it (a query at
                p sees keys p - W + 2 .. p, left = W - 2), with and without the attention sink
                (key 0 always visible); forward only (it runs under no_grad).

The reference is float64 attention of a sample of --rows query rows (the chunk's first and last,
rows at the window's edge, the rest random) over the same bf16 inputs, so its memory stays
[rows, s] per head. For chunk_causal the backward pass gets an output gradient that is zero
outside the sampled rows: then dK and dV depend on those rows alone and the float64 reference
gives them exactly, for every key. Reported per case: the largest absolute error of the output
(and of dQ, dK, dV), the reference's largest magnitude, the tolerance (--tol x that magnitude),
the time of one call after a warm-up call, and on CUDA the peak of
torch.cuda.max_memory_allocated, its statistics reset per case after the inputs exist (the
inputs are counted in the peak and reported separately).

One JSON object per case is printed on a line starting with ``ATTN `` and appended to --out.
A case that raises (out of memory, a kernel refusing the shapes) is reported with its error;
the exit status is 0 either way (gpu_check.py judges the cases).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

GIB = float(1 << 30)


def sample_rows(n_rows: int, count: int, edges: list[int], seed: int) -> "torch.Tensor":
    import torch

    g = torch.Generator().manual_seed(seed)
    picked = {0, n_rows - 1, *[e for e in edges if 0 <= e < n_rows]}
    extra = torch.randperm(n_rows, generator=g)[:max(0, count - len(picked))].tolist()
    return torch.tensor(sorted(picked | set(extra))[:max(count, len(picked))])


def reference(q, k, v, q_pos, allowed_fn, scale, grad_rows=None):
    """float64 attention of the sampled queries q [b, n, r, h] at global positions q_pos [r]
    over k, v [b, ng, s, h]; allowed_fn(q_pos, k_pos) -> [r, s] bool. With grad_rows [b, n, r, h]
    also (dq [b, n, r, h], dk, dv [b, ng, s, h]) of sum(out * grad_rows)."""
    import torch

    n, ng = q.shape[1], k.shape[1]
    q64 = q.double().requires_grad_(grad_rows is not None)
    k64 = k.double().requires_grad_(grad_rows is not None)
    v64 = v.double().requires_grad_(grad_rows is not None)
    kk = k64.repeat_interleave(n // ng, dim=1)
    vv = v64.repeat_interleave(n // ng, dim=1)
    k_pos = torch.arange(k.shape[2], device=q.device)
    allowed = allowed_fn(q_pos[:, None], k_pos[None, :])
    scores = (q64 @ kk.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ vv
    if grad_rows is None:
        return out.detach(), None
    (out * grad_rows.double()).sum().backward()
    return out.detach(), (q64.grad, k64.grad, v64.grad)


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_start(device):
    import torch

    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def _peak_end(device):
    import torch

    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def err_of(got, want) -> float:
    return float((got.double() - want).abs().max())


def plant(q, k, q_rows, q_pos, edges, visible) -> None:
    """Plants a marker at the mask's edges, in place: for each sampled query (row q_rows[i] of q,
    global position q_pos[i]) a random unit direction u is added to that query (all heads) and to
    the keys at positions edges[i] (all K/V heads), scaled so that each planted key's logit
    exceeds the others' by about ln(visible[i]): it takes a share of the softmax comparable to all
    other keys together. An edge moved by one key (the diagonal left out, one future key let in,
    the window one key too long or too short, the sink kept or dropped) then changes the output by
    a good fraction of its size, far above bf16 rounding; random inputs alone hide it (one key of
    thousands)."""
    import math

    import torch

    h = q.shape[-1]
    g = torch.Generator().manual_seed(1234)
    for row, pos, keys, n_visible in zip(q_rows, q_pos, edges, visible):
        u = torch.randn(h, generator=g, dtype=torch.float64)
        u = (u / u.norm()).to(q.device)
        amp = math.sqrt(math.log(max(n_visible, 2)) * math.sqrt(h))  # a*a*scale = ln(visible)
        q[:, :, row] += (amp * u).to(q.dtype)
        for j in keys:
            if 0 <= j < k.shape[2]:
                k[:, :, j] += (amp * u).to(k.dtype)


def chunk_case(s: int, a, device, allowed=None) -> dict:
    """``allowed``: the reference's mask (default the causal one); tests pass wrong masks to show
    that the comparison catches them."""
    import torch

    from megatron_tw.model.chunk_attention import chunk_causal_attention

    torch.manual_seed(a.seed)
    b, n, ng, h = 1, a.heads, a.kv_groups, a.head_dim
    start, c = s // 2, s - s // 2
    scale = h ** -0.5
    q = torch.randn(b, n, c, h, dtype=torch.float32)
    k = torch.randn(b, ng, s, h, dtype=torch.float32)
    v = torch.randn(b, ng, s, h, dtype=torch.float32)
    rows = sample_rows(c, a.rows, [], a.seed)
    pos = (rows + start).tolist()
    # edges of query p: key p (the diagonal, visible) and key p + 1 (the first future key)
    plant(q, k, rows.tolist(), pos, [(p, p + 1) for p in pos], [p + 1 for p in pos])
    q, k, v = (t.to(device=device, dtype=torch.bfloat16).requires_grad_() for t in (q, k, v))
    rows = rows.to(device)
    grad = torch.zeros(b, n, c, h, device=device, dtype=torch.bfloat16)
    grad[:, :, rows] = torch.randn(b, n, len(rows), h, device=device, dtype=torch.bfloat16)
    inputs = sum(t.numel() * t.element_size() for t in (q, k, v, grad))

    def call():
        q.grad = k.grad = v.grad = None
        out = chunk_causal_attention(q, k, v, scale)
        out.backward(grad)
        return out

    call()  # warm-up (kernel selection, workspace)
    base = _peak_start(device)
    t0 = time.perf_counter()
    out = call()
    _sync(device)
    seconds = time.perf_counter() - t0
    peak = _peak_end(device)
    got = out.detach()[:, :, rows]
    dq, dk, dv = q.grad[:, :, rows], k.grad, v.grad
    want, (rdq, rdk, rdv) = reference(q.detach()[:, :, rows], k.detach(), v.detach(),
                                      rows + start, allowed or (lambda qp, kp: kp <= qp), scale,
                                      grad_rows=grad[:, :, rows])
    errors = {"out": err_of(got, want), "dq": err_of(dq, rdq), "dk": err_of(dk, rdk),
              "dv": err_of(dv, rdv)}
    scales = {"out": float(want.abs().max()), "dq": float(rdq.abs().max()),
              "dk": float(rdk.abs().max()), "dv": float(rdv.abs().max())}
    return _result("chunk_causal", s, a, seconds, base, peak, inputs, errors, scales, len(rows),
                   f"queries {start}..{s - 1} over keys 0..{s - 1}, forward+backward")


def sliding_case(s: int, sink: bool, a, device, allowed=None) -> dict:
    """``allowed``: the reference's mask (default the window's, with the sink if ``sink``)."""
    import torch

    from megatron_tw.model.chunk_attention import sliding_window_attention

    torch.manual_seed(a.seed + 1)
    b, n, ng, h = 1, a.heads, a.kv_groups, a.head_dim
    left = a.window - 2  # the sliding-mode scorer's window_size (W - 2, 0): W tokens with the sink
    scale = h ** -0.5
    q = torch.randn(b, n, s, h, dtype=torch.float32)
    k = torch.randn(b, ng, s, h, dtype=torch.float32)
    v = torch.randn(b, ng, s, h, dtype=torch.float32)
    rows = sample_rows(s, a.rows, [left - 1, left, left + 1, left + 2, s // 2], a.seed)
    pos = rows.tolist()
    # edges of query p: the window's first key p - left and the one before it, key 0 (the sink),
    # the diagonal p and the first future key p + 1
    edges = [sorted({p - left, p - left - 1, 0, p, p + 1} - {-1}) for p in pos]
    plant(q, k, pos, pos, edges, [min(p, left) + 1 for p in pos])
    q, k, v = (t.to(device=device, dtype=torch.bfloat16) for t in (q, k, v))
    rows = rows.to(device)
    inputs = sum(t.numel() * t.element_size() for t in (q, k, v))

    def call():
        return sliding_window_attention(q, k, v, 0, left, scale, sink=sink)

    call()
    base = _peak_start(device)
    t0 = time.perf_counter()
    out = call()
    _sync(device)
    seconds = time.perf_counter() - t0
    peak = _peak_end(device)

    def window(qp, kp):
        ok = (kp <= qp) & (kp >= qp - left)
        return ok | (kp == 0) if sink else ok

    want, _ = reference(q[:, :, rows], k, v, rows, allowed or window, scale)
    errors = {"out": err_of(out[:, :, rows], want)}
    scales = {"out": float(want.abs().max())}
    return _result("sliding sink" if sink else "sliding", s, a, seconds, base, peak, inputs,
                   errors, scales, len(rows), f"W={a.window} (left {left}), forward")


def _result(kind, s, a, seconds, base, peak, inputs, errors, scales, rows, what) -> dict:
    tol = {key: a.tol * scales[key] + 1e-6 for key in errors}
    bad = [key for key in errors if not errors[key] <= tol[key]]  # NaN fails too
    return {"case": kind, "seq": s, "status": "failed" if bad else "ok",
            "error": (f"max abs error of {', '.join(bad)} above tolerance: "
                      + ", ".join(f"{k} {errors[k]:.3g} > {tol[k]:.3g}" for k in bad)) if bad
            else None,
            "max_abs_err": max(errors.values()), "errors": errors, "ref_max": scales,
            "tol_rel": a.tol, "rows": rows, "seconds": seconds,
            "peak_gib": None if peak is None else peak / GIB,
            "inputs_gib": inputs / GIB, "what": what}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--lengths", default="16384,32768")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-groups", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--window", type=int, default=4096, help="W of the sliding cases")
    p.add_argument("--rows", type=int, default=64, help="sampled query rows per case")
    p.add_argument("--tol", type=float, default=3e-2,
                   help="tolerance relative to the reference's largest magnitude")
    p.add_argument("--cases", default="chunk_causal,sliding sink,sliding")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="append one JSON line per case here")
    a = p.parse_args(argv)

    import torch

    device = torch.device(a.device)
    if device.type == "cuda":
        torch.cuda.set_device(0)
    lengths = [int(x) for x in a.lengths.split(",") if x.strip()]
    cases = [c.strip() for c in a.cases.split(",") if c.strip()]
    for case in cases:
        for s in lengths:
            t0 = time.perf_counter()
            try:
                if case == "chunk_causal":
                    result = chunk_case(s, a, device)
                elif case in ("sliding sink", "sliding"):
                    result = sliding_case(s, case == "sliding sink", a, device)
                else:
                    raise ValueError(f"unknown case {case!r}")
            except Exception as err:  # noqa: BLE001 - reported as the case's row
                first = (str(err).strip().splitlines() or [""])[0]
                result = {"case": case, "seq": s, "status": "failed",
                          "error": f"{type(err).__name__}: {first}"[:300]}
            result["wall_s"] = time.perf_counter() - t0
            line = json.dumps(result)
            print("ATTN " + line, flush=True)
            if a.out:
                with open(a.out, "a") as f:
                    f.write(line + "\n")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
