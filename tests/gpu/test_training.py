"""Remote training check: a small transformer trained for 50 steps twice from the same seed, once with
local torch SDPA attention and once with attention through a flashserve server (our `flash` kernels)
on the same GPU. The loss curves and the final parameters must agree within bf16 tolerance."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flashserve
from flashserve.server import BackgroundServer, ServerConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

VOCAB, DIM, HEADS, LAYERS, STEPS = 128, 256, 4, 2, 50


def sdpa_varlen(q, k, v, cu, max_len):
    """Local reference: torch SDPA one sequence at a time (bf16, causal)."""
    outs = []
    bounds = cu.tolist()
    for a, b in zip(bounds, bounds[1:]):
        x = [t[a:b].transpose(0, 1).unsqueeze(0) for t in (q, k, v)]
        outs.append(F.scaled_dot_product_attention(*x, is_causal=True)[0].transpose(0, 1))
    return torch.cat(outs)


class Block(nn.Module):
    def __init__(self, attend):
        super().__init__()
        self.attend = attend
        self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.qkv, self.proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.mlp = nn.Sequential(nn.Linear(DIM, 4 * DIM), nn.GELU(), nn.Linear(4 * DIM, DIM))

    def forward(self, x, cu, max_len):
        qkv = self.qkv(self.norm1(x)).view(-1, 3, HEADS, DIM // HEADS).to(torch.bfloat16)
        att = self.attend(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, max_len)
        x = x + self.proj(att.reshape(-1, DIM).float())
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, attend):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(Block(attend) for _ in range(LAYERS))
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, tokens, cu, max_len):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, cu, max_len)
        return self.head(x)


def batches(device):
    """Varlen batches of a learnable sequence task (each token predicts the next of a noisy cycle)."""
    g = torch.Generator().manual_seed(7)
    for _ in range(STEPS):
        lengths = torch.randint(16, 300, (6,), generator=g).tolist()
        seqs = []
        for n in lengths:
            start = torch.randint(0, VOCAB, (1,), generator=g)
            seq = (start + torch.arange(n + 1) * 3) % VOCAB
            noise = torch.rand(n + 1, generator=g) < 0.1
            seqs.append(torch.where(noise, torch.randint(0, VOCAB, (n + 1,), generator=g), seq))
        cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
        inputs = torch.cat([s[:-1] for s in seqs]).to(device)
        targets = torch.cat([s[1:] for s in seqs]).to(device)
        yield inputs, targets, cu.to(device), max(lengths)


def train(attend):
    torch.manual_seed(0)
    model = TinyLM(attend).cuda()
    initial = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for inputs, targets, cu, max_len in batches("cuda"):
        loss = F.cross_entropy(model(inputs, cu, max_len), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    moved = [p.detach() - p0 for p, p0 in zip(model.parameters(), initial)]
    return losses, [p.detach().clone() for p in model.parameters()], moved


def test_remote_training_matches_local():
    with BackgroundServer(ServerConfig(host="127.0.0.1", port=0, backend="flash")) as server:
        client = flashserve.Client(server.target, timeout=300)
        assert client.server_info().backend == "flash" and client.server_info().backward

        def remote(q, k, v, cu, max_len):
            return flashserve.flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=True, client=client)

        remote_losses, remote_params, _ = train(remote)
        client.close()
    local_losses, local_params, local_moved = train(sdpa_varlen)
    print("step  local   remote")
    for i in range(0, STEPS, 10):
        print(f"{i:4d}  {local_losses[i]:.4f}  {remote_losses[i]:.4f}")
    assert all(math.isfinite(x) for x in remote_losses)
    assert local_losses[-1] < local_losses[0] - 1.0, "the task should be learnable"
    worst = max(abs(a - b) for a, b in zip(local_losses, remote_losses))
    assert worst < 0.05, f"loss curves differ by up to {worst:.4f}"
    # Final parameters: the two runs' difference, measured against how far training moved them
    # (AdamW's normalised steps turn bf16 noise on near-zero gradients into full-size steps, so a
    # per-tensor relative norm would measure noise, not agreement).
    diff = torch.cat([(a - b).flatten() for a, b in zip(local_params, remote_params)]).norm()
    moved = torch.cat([m.flatten() for m in local_moved]).norm()
    print(f"final parameters: |local - remote| / |local - initial| = {(diff / moved).item():.3e}")
    assert (diff / moved).item() < 0.1
