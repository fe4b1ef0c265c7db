"""Bad input, sent as raw frames past the client's own checks: each gets the right gRPC status and a
message naming what was wrong, and a good request right after it still succeeds."""
from __future__ import annotations

import dataclasses

import grpc
import pytest
import torch

import flashserve
from flashserve import wire
from flashserve.proto import attention_pb2 as pb
from flashserve.proto import attention_pb2_grpc as pb_grpc
from flashserve.server import BackgroundServer, ServerConfig
from flashserve.server.backends.torch_backend import TorchBackend

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def good_tensors(dtype=torch.float16, heads=4, heads_k=2, dim=32):
    g = torch.Generator().manual_seed(0)
    return {
        "q": torch.randn(20, heads, dim, generator=g).to(dtype),
        "k": torch.randn(24, heads_k, dim, generator=g).to(dtype),
        "v": torch.randn(24, heads_k, dim, generator=g).to(dtype),
        "cu_seqlens_q": torch.tensor([0, 8, 20], dtype=torch.int32),
        "cu_seqlens_k": torch.tensor([0, 10, 24], dtype=torch.int32),
    }


def header_for(tensors, operation=pb.FORWARD, **params):
    params.setdefault("max_seqlen_q", 12)
    params.setdefault("max_seqlen_k", 14)
    return pb.Header(operation=operation, params=pb.AttentionParams(**params),
                     tensors=[wire.describe(n, t) for n, t in tensors.items()])


def call(target, header, tensors, method="Forward", chunk_bytes=1 << 20, frames=None, metadata=None, timeout=30):
    """(status code, details, reply tensors)."""
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.AttentionStub(channel)
        if frames is None:
            frames = list(wire.iter_frames(header, list(tensors.values()), chunk_bytes))
        try:
            reply, outs = wire.read_stream(getattr(stub, method)(iter(frames), timeout=timeout, metadata=metadata))
            return grpc.StatusCode.OK, "", outs
        except grpc.RpcError as exc:
            return exc.code(), exc.details(), None


def assert_good(target):
    t = good_tensors()
    code, details, outs = call(target, header_for(t), t)
    assert code == grpc.StatusCode.OK, details
    assert outs["out"].shape == (20, 4, 32) and torch.isfinite(outs["out"].float()).all()


def expect(server, tensors, code, *fragments, header=None, method="Forward", frames=None, **params):
    header = header if header is not None else header_for(tensors, **params)
    got, details, _ = call(server.target, header, tensors, method=method, frames=frames)
    assert got == code, f"expected {code}, got {got}: {details}"
    for fragment in fragments:
        assert fragment in details, f"{fragment!r} not in {details!r}"
    assert_good(server.target)


def replace(**changes):
    t = good_tensors()
    t.update(changes)
    return t


def test_good_request(server):
    assert_good(server.target)


@pytest.mark.parametrize("dtype,fragment", [(torch.int32, "dtype int32"), (torch.float64, "dtype float64")])
def test_unsupported_dtype(server, dtype, fragment):
    expect(server, good_tensors(dtype=dtype), INVALID, "q:", fragment)


def test_kv_dtype_differs(server):
    t = good_tensors()
    t["k"] = t["k"].float()
    expect(server, t, INVALID, "k:", "differs from q")


def test_head_dim_over_256(server):
    expect(server, good_tensors(dim=264), INVALID, "head dim 264")


class PartialBuildBackend(TorchBackend):
    """Reports the capabilities of an extension built for head-dim classes 32 and 128 only (a dev build)."""

    def capabilities(self):
        return dataclasses.replace(super().capabilities(), head_dim_classes=(32, 128))


def test_head_dim_class_not_built():
    """A head dim whose kernels the build lacks is UNIMPLEMENTED, named with the classes built; the others run
    (d 100 in class 128; d 32), and GetServerInfo lists the classes."""
    with BackgroundServer(ServerConfig(host="127.0.0.1", port=0), backend=PartialBuildBackend("cpu")) as srv:
        with flashserve.Client(srv.target, timeout=30) as c:
            assert list(c.server_info().head_dim_classes) == [32, 128]
        for dim in (64, 200):
            expect(srv, good_tensors(dim=dim), grpc.StatusCode.UNIMPLEMENTED, f"q: head dim {dim}",
                   "built: 32, 128")
        t = good_tensors(dim=100)
        code, details, outs = call(srv.target, header_for(t), t)
        assert code == grpc.StatusCode.OK, details
        assert outs["out"].shape == (20, 4, 100)


def test_heads_not_divisible(server):
    expect(server, good_tensors(heads=6, heads_k=4), INVALID, "4 key/value heads do not divide 6")


def test_v_shape_mismatch(server):
    expect(server, replace(v=torch.randn(23, 2, 32).half()), INVALID, "v:", "differs from k")


def test_k_head_dim_mismatch(server):
    t = replace(k=torch.randn(24, 2, 16).half(), v=torch.randn(24, 2, 16).half())
    expect(server, t, INVALID, "k: head dim 16 differs")


def test_q_wrong_rank(server):
    expect(server, replace(q=torch.randn(20, 4, 32, 1).half()), INVALID, "q: expected 3 dimensions")


@pytest.mark.parametrize("cu,fragment", [
    (torch.tensor([0, 8, 20], dtype=torch.int64), "cu_seqlens_q: must be int32"),
    (torch.tensor([1, 8, 20], dtype=torch.int32), "cu_seqlens_q: must start at 0"),
    (torch.tensor([0, 12, 8, 20], dtype=torch.int32)[[0, 1, 3]] * 0 + torch.tensor([0, 12, 20], dtype=torch.int32),
     None),  # a valid variant, sanity
    (torch.tensor([0, 8, 19], dtype=torch.int32), "last entry 19 must equal the number of tokens (20)"),
    (torch.tensor([0, 8, 20, 20], dtype=torch.int32), "cu_seqlens_k: has 3 entries but cu_seqlens_q has 4"),
    (torch.tensor([0], dtype=torch.int32), "needs batch + 1 >= 2 entries"),
])
def test_bad_cu_seqlens_q(server, cu, fragment):
    t = replace(cu_seqlens_q=cu)
    if fragment is None:
        code, details, _ = call(server.target, header_for(t), t)
        assert code == grpc.StatusCode.OK, details
        return
    expect(server, t, INVALID, fragment)


def test_cu_seqlens_decreasing(server):
    t = replace(cu_seqlens_k=torch.tensor([0, 14, 10, 24], dtype=torch.int32),
                cu_seqlens_q=torch.tensor([0, 8, 8, 20], dtype=torch.int32))
    expect(server, t, INVALID, "cu_seqlens_k: must be non-decreasing")


def test_max_seqlen_below_actual(server):
    expect(server, good_tensors(), INVALID, "max_seqlen_q: 11 is below the longest sequence (12 tokens)",
           max_seqlen_q=11)


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5])
def test_dropout_out_of_range(server, p):
    expect(server, good_tensors(), INVALID, "dropout_p: must be in [0, 1)", dropout_p=p)


def test_bad_scale_softcap_window(server):
    expect(server, good_tensors(), INVALID, "softmax_scale", softmax_scale=-1.0)
    expect(server, good_tensors(), INVALID, "softcap", softcap=-2.0)
    expect(server, good_tensors(), INVALID, "window_size", window_left=-3)


def test_bad_alibi(server):
    expect(server, replace(alibi_slopes=torch.rand(3)), INVALID, "alibi_slopes: shape [3]")
    expect(server, replace(alibi_slopes=torch.rand(4, dtype=torch.float64)), INVALID, "alibi_slopes: must be float32")


def test_header_byte_count_mismatch(server):
    t = good_tensors()
    h = header_for(t)
    h.tensors[0].nbytes += 2
    expect(server, t, INVALID, "q: header says", header=h)


def test_more_bytes_than_described(server):
    t = good_tensors()
    h = header_for(t)
    frames = list(wire.iter_frames(h, list(t.values()), 1 << 20)) + [pb.Frame(chunk=b"\x00" * 16)]
    expect(server, t, INVALID, "more bytes arrived than the header describes", header=h, frames=frames)


def test_truncated_stream(server):
    t = good_tensors()
    h = header_for(t)
    frames = list(wire.iter_frames(h, list(t.values()), 1000))[:-1]
    expect(server, t, INVALID, "the stream ended early", header=h, frames=frames)


def test_header_only_stream(server):
    t = good_tensors()
    h = header_for(t)
    expect(server, t, INVALID, "stream ended early: tensor 'q' got 0 of", header=h, frames=[pb.Frame(header=h)])


def test_empty_stream_and_chunk_first_and_second_header(server):
    t = good_tensors()
    h = header_for(t)
    expect(server, t, INVALID, "ended before any header", header=h, frames=[])
    expect(server, t, INVALID, "first frame must be a header", header=h, frames=[pb.Frame(chunk=b"abc")])
    frames = [pb.Frame(header=h), pb.Frame(header=h)]
    expect(server, t, INVALID, "second header", header=h, frames=frames)


def test_missing_and_duplicated_tensor(server):
    t = good_tensors()
    del t["v"]
    expect(server, t, INVALID, "missing tensor 'v'")
    t = good_tensors()
    h = header_for(t)
    h.tensors.append(h.tensors[0])
    expect(server, t, INVALID, "tensor 'q' is described twice", header=h)
    expect(server, replace(extra=torch.zeros(3)), INVALID, "unexpected tensor 'extra'")


def test_unknown_and_mismatched_operation(server):
    t = good_tensors()
    expect(server, t, INVALID, "operation: unknown operation 7", header=header_for(t, operation=7))
    expect(server, t, INVALID, "BACKWARD sent to the Forward method", header=header_for(t, operation=pb.BACKWARD))


def test_backward_bad_lse(server):
    t = good_tensors(dtype=torch.float32)
    t.update(dout=torch.randn(20, 4, 32), out=torch.randn(20, 4, 32), softmax_lse=torch.randn(20, 4))
    expect(server, t, INVALID, "softmax_lse: must be float32 (4, 20)", method="Backward",
           header=header_for(t, operation=pb.BACKWARD))


def test_backward_good_request(server):
    t = good_tensors(dtype=torch.float32)
    h = header_for(t)
    code, details, fwd = call(server.target, h, t)
    assert code == grpc.StatusCode.OK
    t.update(dout=torch.randn(20, 4, 32), out=fwd["out"], softmax_lse=fwd["softmax_lse"])
    code, details, grads = call(server.target, header_for(t, operation=pb.BACKWARD), t, method="Backward")
    assert code == grpc.StatusCode.OK, details
    assert grads["dq"].shape == (20, 4, 32) and grads["dk"].shape == (24, 2, 32)


# ---- limits and auth: servers of their own ---------------------------------------------------
@pytest.fixture(scope="module")
def small_server():
    cfg = ServerConfig(host="127.0.0.1", port=0, backend="torch", max_tokens=60, max_request_bytes=64 << 10)
    with BackgroundServer(cfg) as srv:
        yield srv


def test_over_token_limit(small_server):
    t = replace(q=torch.randn(40, 4, 32).half(), cu_seqlens_q=torch.tensor([0, 20, 40], dtype=torch.int32))
    expect(small_server, t, grpc.StatusCode.RESOURCE_EXHAUSTED, "64 q+k tokens", "limit is 60", max_seqlen_q=20)


def test_over_byte_limit(small_server):
    t = replace(q=torch.randn(20, 4, 256).half(), k=torch.randn(24, 2, 256).half(), v=torch.randn(24, 2, 256).half())
    expect(small_server, t, grpc.StatusCode.RESOURCE_EXHAUSTED, "bytes of tensors", "--max-request-bytes")


@pytest.fixture(scope="module")
def token_server():
    cfg = ServerConfig(host="127.0.0.1", port=0, backend="torch", token="s3cret")
    with BackgroundServer(cfg) as srv:
        yield srv


def test_bearer_token(token_server):
    t = good_tensors()
    code, details, _ = call(token_server.target, header_for(t), t)
    assert code == grpc.StatusCode.UNAUTHENTICATED and "missing bearer token" in details
    code, details, _ = call(token_server.target, header_for(t), t, metadata=(("authorization", "Bearer nope"),))
    assert code == grpc.StatusCode.UNAUTHENTICATED and "invalid bearer token" in details
    code, details, _ = call(token_server.target, header_for(t), t, metadata=(("authorization", "Bearer s3cret"),))
    assert code == grpc.StatusCode.OK, details
    with flashserve.Client(token_server.target, token="s3cret") as c:
        assert c.server_info().backend == "torch"
    with flashserve.Client(token_server.target, token="wrong") as c:
        with pytest.raises(flashserve.RemoteError) as err:
            c.server_info()
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED


# ---- the client's own checks: flash_attn's errors, raised before anything is sent -------------
def test_client_checks_raise_flash_attn_errors():
    q = torch.randn(2, 8, 4, 32, dtype=torch.float16)
    k = torch.randn(2, 8, 3, 32, dtype=torch.float16)
    bad_client = flashserve.Client("127.0.0.1:1")  # nothing listens: the checks must fire first
    with pytest.raises(RuntimeError, match="Number of heads in key/value must divide number of heads in query"):
        flashserve.flash_attn_func(q, k, k, client=bad_client)
    with pytest.raises(RuntimeError, match="FlashAttention only support fp16 and bf16 data type"):
        flashserve.flash_attn_func(q.int(), q.int(), q.int(), client=bad_client)
    with pytest.raises(RuntimeError, match="query and key must have the same dtype"):
        flashserve.flash_attn_func(q, q.float(), q.float(), client=bad_client)
    with pytest.raises(RuntimeError, match="head dimension at most 256"):
        big = torch.randn(1, 2, 1, 264, dtype=torch.float16)
        flashserve.flash_attn_func(big, big, big, client=bad_client)
    with pytest.raises(RuntimeError, match=r"k must have shape \(batch_size, seqlen_k"):
        flashserve.flash_attn_func(q, q[:1], q[:1], client=bad_client)
    with pytest.raises(RuntimeError, match="cu_seqlens_q must have dtype int32"):
        flat = q.reshape(16, 4, 32)
        cu = torch.tensor([0, 16])
        flashserve.flash_attn_varlen_func(flat, flat, flat, cu, cu.int(), 16, 16, client=bad_client)
    with pytest.raises(RuntimeError, match="dropout_p must be in"):
        flashserve.flash_attn_func(q, q, q, dropout_p=1.0, client=bad_client)
    with pytest.raises(RuntimeError, match="ALiBi slopes must have dtype fp32"):
        flashserve.flash_attn_func(q, q, q, alibi_slopes=torch.ones(4, dtype=torch.float16), client=bad_client)
    with pytest.raises(NotImplementedError, match="block_table"):
        flat = q.reshape(16, 4, 32)
        cu = torch.tensor([0, 16], dtype=torch.int32)
        flashserve.flash_attn_varlen_func(flat, flat, flat, cu, cu, 16, 16, block_table=cu, client=bad_client)
    bad_client.close()
