"""The torch backend's explicit backward (server/backends/reference.py) against autograd through the
independent naive reference, with every feature at once; and proof that it never re-enters autograd."""
from __future__ import annotations

import itertools

import pytest
import torch

from flashserve.server.backends import AttentionParams, reference
from naive import naive_attention

LENS_Q, LENS_K = [7, 1, 0, 30], [9, 3, 4, 20]  # includes an empty query sequence and sq != sk


def _cu(lens):
    return torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32)


def _case(heads_k, causal, window, softcap, alibi, dropout_p, seed=0):
    g = torch.Generator().manual_seed(seed)
    cq, ck = _cu(LENS_Q), _cu(LENS_K)
    q = torch.randn(int(cq[-1]), 4, 16, dtype=torch.float64, generator=g)
    k = torch.randn(int(ck[-1]), heads_k, 16, dtype=torch.float64, generator=g)
    v = torch.randn(int(ck[-1]), heads_k, 16, dtype=torch.float64, generator=g)
    dout = torch.randn(q.shape, dtype=torch.float64, generator=g)
    slopes = torch.rand(4, dtype=torch.float64, generator=g) if alibi else None
    params = AttentionParams(softmax_scale=0.3, causal=causal, window_left=window[0], window_right=window[1],
                             softcap=softcap, dropout_p=dropout_p, seed=11, offset=0, max_seqlen_q=max(LENS_Q),
                             max_seqlen_k=max(LENS_K))
    return q, k, v, dout, cq, ck, slopes, params


@pytest.mark.parametrize("heads_k", [4, 2, 1])
@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (5, 3))])
@pytest.mark.parametrize("softcap,alibi,dropout_p", [(0.0, False, 0.0), (2.0, True, 0.0), (0.0, True, 0.3),
                                                     (2.0, False, 0.3)])
def test_explicit_backward_matches_autograd(heads_k, causal, window, softcap, alibi, dropout_p):
    q, k, v, dout, cq, ck, slopes, params = _case(heads_k, causal, window, softcap, alibi, dropout_p)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out, _ = naive_attention(*leaves, cq, ck, scale=0.3, causal=causal, window=window, softcap=softcap,
                             alibi=slopes, dropout_p=dropout_p, seed=11, offset=0)
    want = torch.autograd.grad(out, leaves, dout)
    got = reference.backward(dout, q, k, v, None, None, cq, ck, params, slopes, compute_dtype=torch.float64)
    for name, a, b in zip("qkv", (got.dq, got.dk, got.dv), want):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-9), f"d{name}: max error {(a - b).abs().max().item()}"


def test_backward_does_not_reenter_autograd(monkeypatch):
    """An in-process server on CUDA runs this while the caller's autograd engine sits inside our client's
    backward; a nested torch.autograd call would wait for that engine's busy device thread (seen as a
    120 s deadline on the H200). The torch backend must compute gradients without autograd."""
    def refuse(*args, **kwargs):
        raise AssertionError("torch backend backward called into torch.autograd")

    monkeypatch.setattr(torch.autograd, "grad", refuse)
    monkeypatch.setattr(torch.autograd, "backward", refuse)
    monkeypatch.setattr(torch.Tensor, "backward", refuse)
    q, k, v, dout, cq, ck, slopes, params = _case(2, True, (-1, -1), 2.0, True, 0.3)
    got = reference.backward(dout, q, k, v, None, None, cq, ck, params, slopes, compute_dtype=torch.float64)
    assert torch.isfinite(got.dq).all() and got.dk.abs().sum() > 0
