"""Dropout: the mask is the kernels' Philox mask, its rate is right, forward and backward agree,
and torch.manual_seed makes it reproducible."""
from __future__ import annotations

import torch

import flashserve
from flashserve.server.backends.philox import dropout_keep_mask, philox4x32_10
from naive import naive_attention, rel_err


def test_philox_known_answers():
    # Random123's published known-answer vectors for Philox4x32-10
    def run(words, key):
        return [int(w) for w in philox4x32_10(*(torch.tensor([x]) for x in words), key)]

    assert run([0, 0, 0, 0], 0) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert run([0xFFFFFFFF] * 4, 0xFFFFFFFFFFFFFFFF) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    assert run([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], (0x299F31D0 << 32) | 0xA4093822) == \
        [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


def test_mask_depends_on_every_counter_word():
    base = dropout_keep_mask(5, 0, 0, 2, 16, 32, 0.5)
    assert not torch.equal(base, dropout_keep_mask(6, 0, 0, 2, 16, 32, 0.5))  # seed
    assert not torch.equal(base, dropout_keep_mask(5, 1, 0, 2, 16, 32, 0.5))  # offset
    assert not torch.equal(base, dropout_keep_mask(5, 0, 2, 2, 16, 32, 0.5))  # sequence/head
    assert not torch.equal(base[0], base[1])  # heads differ
    assert torch.equal(base, dropout_keep_mask(5, 0, 0, 2, 16, 32, 0.5))  # deterministic


def _expected_seed(seed):
    torch.manual_seed(seed)
    return int(torch.randint(0, 2 ** 62, (1,), dtype=torch.int64).item())


def _inputs(gen_seed, total, heads, dim, heads_k=None):
    g = torch.Generator().manual_seed(gen_seed)
    q = torch.randn(total, heads, dim, generator=g).requires_grad_(True)
    k = torch.randn(total, heads_k or heads, dim, generator=g).requires_grad_(True)
    v = torch.randn(total, heads_k or heads, dim, generator=g).requires_grad_(True)
    return q, k, v


def test_keep_rate_from_returned_mask(client):
    p = 0.3
    lengths = [256, 300]
    cu = torch.tensor([0, 256, 556], dtype=torch.int32)
    q, k, v = _inputs(1, 556, 4, 16)
    _, _, s_dmask = flashserve.flash_attn_varlen_func(q, k, v, cu, cu, 300, 300, dropout_p=p, return_attn_probs=True,
                                                      client=client)
    assert s_dmask.shape == (2, 4, 384, 384)
    kept = dropped = 0
    for b, n in enumerate(lengths):
        block = s_dmask[b, :, :n, :n]
        dropped += int((block < 0).sum())
        kept += int((block > 0).sum())
    assert kept + dropped == 4 * (256 ** 2 + 300 ** 2)  # every visible probability is non-zero
    assert abs(dropped / (kept + dropped) - p) < 0.01


def test_forward_and_backward_use_the_same_mask(client):
    p = 0.25
    cu = torch.tensor([0, 40, 41, 100], dtype=torch.int32)
    q, k, v = _inputs(2, 100, 4, 32, heads_k=2)
    torch.manual_seed(11)
    out = flashserve.flash_attn_varlen_func(q, k, v, cu, cu, 59, 59, dropout_p=p, causal=True, client=client)
    refs = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref_out, _ = naive_attention(*refs, cu, cu, causal=True, dropout_p=p, seed=_expected_seed(11))
    assert rel_err(out, ref_out) < 2e-5
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(ref_out, refs, g.double())
    for a, b in zip(got, want):
        assert rel_err(a, b) < 4e-5


def test_same_seed_same_output(client):
    q, k, v = _inputs(3, 64, 2, 16)
    cu = torch.tensor([0, 64], dtype=torch.int32)
    runs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        runs.append(flashserve.flash_attn_varlen_func(q, k, v, cu, cu, 64, 64, dropout_p=0.5, client=client))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])
    no_drop = flashserve.flash_attn_varlen_func(q, k, v, cu, cu, 64, 64, client=client)
    assert not torch.equal(runs[0], no_drop)
