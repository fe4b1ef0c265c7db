"""flashserve.heap: once a process keeps freed memory, large message buffers reuse its pages instead of faulting
fresh ones in on every transfer; `flashserve serve` applies it at start (--heap-keep-mb), a Client from its first
call that sends a large payload over gRPC chunks (unless heap_keep_bytes=0)."""
from __future__ import annotations

import subprocess
import sys

import flashserve
import flashserve.heap
from flashserve.server import cli

# 64 MB of new 4 MB messages per round, every page written, then freed: what a large transfer's chunks do
PROBE = """
import resource, sys
from flashserve.heap import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory(256 << 20)
def transfer():
    chunks = [b"\\x01" * (4 << 20) for _ in range(16)]
    del chunks
for _ in range(3):
    transfer()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    transfer()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120, check=True)
    return int(out.stdout.strip())


def test_kept_memory_is_reused_without_page_faults():
    default, kept = page_faults("default"), page_faults("keep")
    assert default > 10 * 16 * 1024 // 2, default  # the allocator's defaults: most of the pages faulted in again
    assert kept * 20 < default, (kept, default)


def test_keep_freed_memory_is_idempotent_and_off_at_zero():
    assert flashserve.heap.keep_freed_memory(0) is False
    assert flashserve.heap.keep_freed_memory(64 << 20) is True
    assert flashserve.heap.keep_freed_memory(32 << 20) is True  # already in force (a larger one)


def test_serve_applies_it_at_start_and_a_client_once_it_moves_large_payloads(monkeypatch):
    calls = []
    monkeypatch.setattr(flashserve.heap, "keep_freed_memory", lambda n: calls.append(n) or True)

    def no_server(coro):
        coro.close()
        return 0

    monkeypatch.setattr(cli.asyncio, "run", no_server)
    parser = cli.build_parser()
    assert cli.cmd_serve(parser.parse_args(["serve"])) == 0
    assert calls == [256 << 20]
    assert cli.cmd_serve(parser.parse_args(["serve", "--heap-keep-mb", "0"])) == 0
    assert calls == [256 << 20]
    client = flashserve.Client("127.0.0.1:1")  # (no connection is made until a call)
    client._keep_heap_for(1 << 20)  # a small payload: the process's allocator is left alone
    assert calls == [256 << 20]
    client._keep_heap_for(64 << 20)  # a large one over gRPC chunks: keep freed memory
    assert calls == [256 << 20, 256 << 20]
    client.close()
    client = flashserve.Client("127.0.0.1:1", heap_keep_bytes=0)
    client._keep_heap_for(64 << 20)
    assert calls == [256 << 20, 256 << 20]
    client.close()
