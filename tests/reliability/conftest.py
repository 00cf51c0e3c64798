"""The reliability suite: fuzzed requests, overload, cancel storms, signals, reload, soak.

Every test runs a real server on a loopback socket over the tiny models of
tests/conftest.py. The fixtures of tests/e2e/conftest.py are reused here.
Fuzzing is bounded and derandomized (the same examples on every run):
`FUZZ_EXAMPLES=2000 pytest tests/reliability -k fuzz` runs more of them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from tests.e2e.conftest import (  # noqa: F401  (fixtures)
    RunningServer,
    free_port,
    long_models,
    make_config,
    start_server,
)

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))

# derandomized: CI sees the same examples on every run, and no example database is kept
FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="package")
def fuzz_server(tiny_models: Path) -> Iterator[RunningServer]:
    """One server (gRPC and HTTP fronts) over the read-only tiny models, for every fuzz test."""
    running = RunningServer(make_config(tiny_models, http_port=free_port()))
    yield running
    running.stop()
