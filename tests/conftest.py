"""Shared fixtures: one real loopback gRPC server (torch backend, CPU) for the whole session."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests/naive.py

import flashserve  # noqa: E402
from flashserve.server import BackgroundServer, ServerConfig  # noqa: E402


@pytest.fixture(scope="session")
def server():
    with BackgroundServer(ServerConfig(host="127.0.0.1", port=0, backend="torch", device="cpu")) as srv:
        yield srv


@pytest.fixture(scope="session")
def client(server):
    c = flashserve.Client(server.target, timeout=120)
    yield c
    c.close()
