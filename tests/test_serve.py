"""``certseg serve``'s failure reason: taken from the error lines of the tritonserver log, never a warning."""

from __future__ import annotations

from pathlib import Path

import pytest

from certseg.engine.runtimes.serve import TritonBinary, TritonServer, error_message, free_ports

STARTUP = [
    'I1129 21:00:00.000100 4242 pinned_memory_manager.cc:277] "Pinned memory pool is created at \'0x7f\' with '
    'size 268435456"',
    'W1129 21:00:00.000200 4242 pinned_memory_manager.cc:273] "Unable to allocate pinned system memory, pinned memory '
    'pool will not be available: no CUDA-capable device is detected"',
    'E1129 21:00:00.000300 4242 server.cc:251] "CudaDriverHelper has not been initialized."',
    "I1129 21:00:00.000400 4242 model_lifecycle.cc:473] \"loading: certseg_prepare:1\"",
]


def server_with_log(tmp_path: Path, lines: list[str]) -> TritonServer:
    log = tmp_path / "tritonserver.log"
    log.write_text("\n".join(lines) + "\n")
    return TritonServer(tmp_path, binary=TritonBinary(Path("/bin/false"), bundled=False), log_path=log)


def test_warnings_are_never_quoted_as_the_reason(tmp_path: Path) -> None:
    """A log whose last lines are warnings (tritonserver's and a Python warning from a step model)."""
    tail = ['W1129 21:00:01.000000 4242 model_repository_manager.cc:1412] "Poll failed for model directory \'x\': '
            'config.pbtxt is missing"',
            "/models/certseg_prepare/1/model.py:12: UserWarning: TypedStorage is deprecated",
            "  warnings.warn("]
    summary = server_with_log(tmp_path, STARTUP + tail).log_summary()
    assert summary.startswith("no error line in the log (log: ")
    assert "Poll failed" not in summary and "Warning" not in summary and "Pinned" not in summary


def test_the_last_error_lines_are_the_reason(tmp_path: Path) -> None:
    lines = STARTUP + [
        'E1129 21:00:01.100000 4242 model_lifecycle.cc:654] "failed to load \'certseg_segment\' version 1: Invalid '
        'argument: unexpected inference output \'labels\'\\nmore detail"',
        'W1129 21:00:01.200000 4242 server.cc:300] "Timeout 30: Found 0 live models and 0 in-flight non-inference '
        'requests"',
        "error: creating server: Internal - failed to load all models",
        'W1129 21:00:01.300000 4242 server.cc:310] "Shutting down with models still loading"',
    ]
    summary = server_with_log(tmp_path, lines).log_summary()
    assert summary.split(" (log: ")[0] == (
        "failed to load 'certseg_segment' version 1: Invalid argument: unexpected inference output 'labels' | "
        "error: creating server: Internal - failed to load all models"
    )


@pytest.mark.parametrize(
    "line, expected",
    [
        ('E1129 21:00:00.000001 7 grpc_server.cc:2466] "Failed to listen on 127.0.0.1:8001"',
         "Failed to listen on 127.0.0.1:8001"),
        ('F1129 21:00:00.000001 7 backend.cc:1] "fatal: stub crashed"', "fatal: stub crashed"),
        ("RuntimeError: CUDA out of memory", "RuntimeError: CUDA out of memory"),
        ('W1129 21:00:00.000001 7 server.cc:1] "error in the name of a warning"', None),
        ("I1129 21:00:00.000001 7 server.cc:1] \"Error codes are listed below\"", None),
        ("DeprecationWarning: Error handling changes", None),
        ('E1129 21:00:00.000001 7 metrics.cc:1] "Unable to get NVML handle"', None),
    ],
)
def test_error_lines_are_told_from_other_lines(line: str, expected: str | None) -> None:
    assert error_message(line) == expected


def test_free_ports_are_distinct_and_avoid_the_ports_given(tmp_path: Path) -> None:
    """Ports are probed with every probe held open, so one run never gets the same port twice (probing one at a
    time once gave HTTP and metrics one port, and tritonserver refused to start)."""
    ports = free_ports(64)
    assert len(set(ports)) == 64
    assert not set(free_ports(8, taken=ports[:4])) & set(ports[:4])
    binary = TritonBinary(Path("/bin/false"), bundled=False)
    for _ in range(20):
        server = TritonServer(tmp_path, binary=binary, log_path=tmp_path / "log")
        assert len({server.http_port, server.grpc_port, server.metrics_port}) == 3
    given = TritonServer(tmp_path, binary=binary, log_path=tmp_path / "log", grpc_port=ports[0])
    assert given.grpc_port == ports[0] and ports[0] not in (given.http_port, given.metrics_port)
