"""`flashserve bench` against a local server: a short sweep, every JSON field, plot, progress bar, errors by code."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from flashserve.server import BackgroundServer, ServerConfig
from flashserve.server.cli import main

LEVEL_FIELDS = {"concurrency", "requests", "errors", "error_count", "error_examples", "duration_s", "requests_per_s", "tokens_per_s",
                "payload_gb_s", "payload_bytes", "latency_ms", "mean_batch_requests", "launches_per_request",
                "server_compute_s_per_request", "stage_ms_p50"}
SMALL = ["--tokens", "64", "--heads", "2", "--head-dim", "16", "--dtype", "float32"]


@pytest.fixture(scope="module")
def bench_server():
    cfg = ServerConfig(host="127.0.0.1", port=0, backend="torch", allow_shm=True, batch_delay_us=200)
    with BackgroundServer(cfg) as srv:
        yield srv


def check_report(report, levels, op, transport):
    assert {"date", "target", "machine", "server", "versions", "workload", "transport", "levels"} <= set(report)
    assert report["transport"] == transport and report["workload"]["op"] == op
    assert [r["concurrency"] for r in report["levels"]] == levels
    for r in report["levels"]:
        assert set(r) == LEVEL_FIELDS
        assert r["requests"] > 0 and r["error_count"] == 0 and r["errors"] == {}
        assert r["requests_per_s"] > 0 and r["tokens_per_s"] == pytest.approx(r["requests_per_s"] * 64)
        assert r["payload_gb_s"] > 0 and r["payload_bytes"] > 0
        lat = r["latency_ms"]
        assert set(lat) == {"p50", "p90", "p99", "mean"} and 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
        assert r["mean_batch_requests"] >= 1 and 0 < r["launches_per_request"] <= 1
        st = r["stage_ms_p50"]  # where a request's time went: server stages, and the rest of its round trip
        assert set(st) == {"receive", "queue", "copy_in", "compute", "copy_out", "outside"}
        assert st["compute"] > 0 and st["outside"] > 0 and min(st.values()) >= 0
        assert sum(st.values()) <= 2 * lat["p99"]  # medians of parts of requests no slower than that


def test_sweep_json_and_plot(bench_server, tmp_path):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    rc = main(["bench", bench_server.target, *SMALL, "--concurrency", "1,3", "--requests", "9", "--duration", "5",
               "--json", str(out), "--plot", str(png), "--no-progress"])
    assert rc == 0
    report = json.loads(out.read_text())
    check_report(report, [1, 3], "forward", "shm")
    assert [r["requests"] for r in report["levels"]] == [9, 9]  # bounded by count
    # payload per forward request: q, k, v in; out + lse back
    per_request = 4 * 64 * 2 * 16 * 4 + 2 * 64 * 4 + 2 * 2 * 4  # + two cu_seqlens of one sequence
    assert report["levels"][0]["payload_bytes"] == 9 * per_request
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_forward_backward_bytes_varlen_duration(bench_server, capsys):
    rc = main(["bench", bench_server.target, *SMALL, "--op", "forward+backward", "--transport", "bytes",
               "--seqs", "3", "--varlen", "--concurrency", "2", "--duration", "0.5", "--json", "-", "--no-progress"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    check_report(report, [2], "forward+backward", "bytes")
    assert sum(report["workload"]["lengths"]) == 64 and len(report["workload"]["lengths"]) == 3
    assert report["levels"][0]["duration_s"] < 5  # bounded in time


def test_errors_counted_by_status_code(bench_server, capsys):
    # head dim 512 is over the server's limit: every request fails with INVALID_ARGUMENT, nothing hangs
    rc = main(["bench", bench_server.target, "--tokens", "8", "--heads", "1", "--head-dim", "512", "--dtype",
               "float32", "--concurrency", "2", "--requests", "4", "--warmup", "0", "--json", "-", "--no-progress"])
    assert rc == 1
    level = json.loads(capsys.readouterr().out)["levels"][0]
    assert level["requests"] == 0 and level["errors"] == {"INVALID_ARGUMENT": 4}
    assert "head" in level["error_examples"]["INVALID_ARGUMENT"]  # the first message, for the operator


def test_cli_progress_bar_and_table(bench_server):
    env = dict(os.environ, FLASHSERVE_TARGET=bench_server.target)
    run = subprocess.run([sys.executable, "-m", "flashserve.server.cli", "bench", *SMALL, "--concurrency", "1,2",
                          "--requests", "4"], capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    assert "flashserve bench" in run.stderr and "req" in run.stderr  # tqdm's bar
    assert "| concurrency | req/s |" in run.stdout and run.stdout.count("\n| ") >= 3


def test_clients_spread_over_processes(bench_server, tmp_path):
    out = tmp_path / "procs.json"
    rc = main(["bench", bench_server.target, *SMALL, "--concurrency", "4", "--processes", "2", "--requests", "10",
               "--duration", "10", "--json", str(out), "--no-progress"])
    assert rc == 0
    report = json.loads(out.read_text())
    check_report(report, [4], "forward", "shm")
    assert report["client_processes"] == 2
    assert report["levels"][0]["requests"] == 10  # 5 + 5 from the two processes, merged


def test_processes_of_a_level_start_together_and_share_the_count(bench_server):
    """Two measure() runs as the processes of one level (threads here, with the same group objects): the one
    that is ready later holds the other's clock back, and the count is a total over both, not a share each."""
    import multiprocessing
    import threading
    import time

    import flashserve
    from flashserve.server import loadtest

    workload = loadtest.Workload(tokens=64, heads=2, head_dim=16, dtype="float32")
    group = (threading.Barrier(2), multiprocessing.Value("q", 0))
    samples = [None, None]

    def run(i, delay):
        time.sleep(delay)  # a process that takes longer to start
        samples[i] = loadtest.measure(lambda: flashserve.Client(bench_server.target), workload, 2 - i, 30,
                                      count=12, warmup=1, group=group)

    threads = [threading.Thread(target=run, args=(0, 0.0)), threading.Thread(target=run, args=(1, 0.6))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert abs(samples[0]["start"] - samples[1]["start"]) < 0.1  # not 0.6 s apart
    assert len(samples[0]["latencies"]) + len(samples[1]["latencies"]) == 12
    report = loadtest.summarize(samples, 3, 64)
    assert report["requests"] == 12 and report["duration_s"] < 10


def test_a_process_that_fails_to_start_releases_the_others_at_once():
    import multiprocessing
    import threading
    import time

    from flashserve.server import loadtest

    barrier = threading.Barrier(2)
    loadtest._join_group(barrier, multiprocessing.Value("q", 0))
    try:
        t0 = time.perf_counter()
        waiter = threading.Thread(target=lambda: pytest.raises(threading.BrokenBarrierError, barrier.wait, 60))
        waiter.start()
        with pytest.raises(Exception):  # a workload it cannot build: this "process" fails before the barrier
            loadtest._process_level(("127.0.0.1:1", "bytes", {}, dict(dtype="no-such-dtype"), 1, 1.0, 1, 1))
        waiter.join(30)
        assert not waiter.is_alive() and time.perf_counter() - t0 < 30
    finally:
        loadtest._join_group(None, None)
        loadtest._group = None


def test_client_threads_use_one_torch_thread_and_the_caller_keeps_its_own(bench_server, monkeypatch):
    import threading

    import torch

    from flashserve.server import loadtest

    seen = []
    step = loadtest.Workload.step

    def recording_step(self, client, keep):
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return step(self, client, keep)

    monkeypatch.setattr(loadtest.Workload, "step", recording_step)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rc = main(["bench", bench_server.target, *SMALL, "--concurrency", "3", "--requests", "6", "--no-progress"])
        assert rc == 0
        client_threads = {name for name, _ in seen}
        assert len(client_threads) == 3 and threading.current_thread().name not in client_threads
        assert {n for _, n in seen} == {1}  # every request's copies ran on one torch thread
        assert torch.get_num_threads() == 2  # the caller's setting is back
    finally:
        torch.set_num_threads(before)
