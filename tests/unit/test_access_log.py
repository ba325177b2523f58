"""The services' access log: a line per RPC, but one in MLMESH_PREDICTION_LOG_EVERY of the
predictions answered OK; every error has its line."""

from __future__ import annotations

import logging
import time

import pytest

from services.common.interceptors import _Rpc

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "services.common.interceptors"]


def test_one_prediction_in_n_answered_ok_is_logged_and_every_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rpc = _Rpc(MODEL_INFER, "unary", None, log_every=3)
    with caplog.at_level(logging.INFO, logger="services.common.interceptors"):
        for _ in range(7):
            rpc.finish("alice", "OK", time.perf_counter())
        rpc.finish("alice", "INVALID_ARGUMENT", time.perf_counter())
        rpc.finish("alice", "INTERNAL", time.perf_counter())
    logged = lines(caplog)
    ok = [line for line in logged if "code=OK" in line]
    assert len(ok) == 3  # the 1st, 4th and 7th
    assert all("one in 3 answered OK is logged" in line for line in ok)
    assert sum("code=INVALID_ARGUMENT" in line for line in logged) == 1
    assert sum("code=INTERNAL" in line for line in logged) == 1
    assert all(f"rpc {MODEL_INFER} client=alice" in line for line in logged)


def test_log_every_one_logs_every_call(caplog: pytest.LogCaptureFixture) -> None:
    rpc = _Rpc("/mlmesh.registry.v1.RegistryService/ListModels", "unary", None)
    with caplog.at_level(logging.INFO, logger="services.common.interceptors"):
        for _ in range(4):
            rpc.finish("bob", "OK", time.perf_counter())
    assert len(lines(caplog)) == 4
