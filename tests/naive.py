"""An independent float64 attention reference for the tests: full score matrices, explicit masks,
torch.softmax. Written separately from server/backends/reference.py so that the torch backend is
checked against code it does not share (only the Philox mask generator is shared, and it has its
own known-answer test)."""
from __future__ import annotations

import torch

from flashserve.server.backends.philox import dropout_keep_mask


def naive_attention(q, k, v, cu_q, cu_k, scale=None, causal=False, window=(-1, -1), softcap=0.0, alibi=None,
                    dropout_p=0.0, seed=0, offset=0):
    """Varlen attention in float64; differentiable. Returns (out (total_q, H, D), lse (H, total_q))."""
    heads, dim = q.shape[1], q.shape[2]
    group = heads // k.shape[1]
    scale = dim ** -0.5 if scale is None else scale
    cq, ck = [int(x) for x in cu_q], [int(x) for x in cu_k]
    outs, lses = [], []
    for b in range(len(cq) - 1):
        qs = q[cq[b]:cq[b + 1]].double()
        ks = k[ck[b]:ck[b + 1]].double()[:, torch.arange(heads) // group]
        vs = v[ck[b]:ck[b + 1]].double()[:, torch.arange(heads) // group]
        sq, sk = qs.shape[0], ks.shape[0]
        s = torch.einsum("ihd,jhd->hij", qs, ks)
        logits = softcap * torch.tanh(s * scale / softcap) if softcap > 0 else s * scale
        i = torch.arange(sq).view(-1, 1)
        j = torch.arange(sk).view(1, -1)
        if alibi is not None:
            slopes = (alibi[b] if alibi.dim() == 2 else alibi).double()
            logits = logits - slopes.view(-1, 1, 1) * (i + sk - sq - j).abs().double()
        left, right = window
        if causal:
            right = 0
        allowed = torch.ones(sq, sk, dtype=torch.bool)
        if right >= 0:
            allowed &= j <= i + sk - sq + right
        if left >= 0:
            allowed &= j >= i + sk - sq - left
        any_key = allowed.any(dim=-1)  # (sq,)
        logits = logits.masked_fill(~allowed, float("-inf"))
        logits = torch.where(any_key.view(1, -1, 1), logits, torch.zeros_like(logits))
        p = torch.softmax(logits, dim=-1) * any_key.view(1, -1, 1)
        lse = torch.logsumexp(logits, dim=-1).masked_fill(~any_key.view(1, -1), float("inf"))
        if dropout_p > 0 and sk > 0:
            keep = dropout_keep_mask(seed, offset, b * heads, heads, sq, sk, dropout_p)
            p = p * keep / (1 - dropout_p)
        outs.append(torch.einsum("hij,jhd->ihd", p, vs))
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses, dim=1)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max |ref| (infinities must match exactly)."""
    x, ref = x.detach().double(), ref.detach().double()
    inf = torch.isinf(ref)
    if inf.any():
        assert torch.equal(torch.isinf(x), inf) and torch.equal(x[inf], ref[inf]), "infinities differ"
        x, ref = x[~inf], ref[~inf]
    if ref.numel() == 0:
        return 0.0
    assert not torch.isnan(x).any(), "NaN in result"
    return float((x - ref).abs().max() / ref.abs().max().clamp_min(1e-6))


TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}
