"""``certseg-bench --runtime triton`` against real bundled tritonservers on loopback: the same entries as in-process
ONNX Runtime on the very model files the servers serve, a bundled server started and stopped by PID, a server lost
mid-run, every server lost (one line, a resumable results file).

Servers are started on 127.0.0.1 free ports and stopped by their own PID (``TritonServer``); the two shared ones
live for the module. Tiny procedural scenes, SegCertify but for one DenoiseCertify check, small n, so the module
stays short.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

pytest.importorskip("onnxruntime")
pytest.importorskip("tritonclient.grpc")

from certseg.bench import cli  # noqa: E402
from certseg.bench.results import load_entries, read_lines  # noqa: E402
from certseg.engine.errors import ServerError  # noqa: E402
from certseg.engine.models.registry import shipped_models  # noqa: E402
from certseg.engine.runtimes.serve import TritonServer  # noqa: E402
from certseg.engine.runtimes.triton_runtime import server_statistics  # noqa: E402

pytestmark = pytest.mark.skipif(
    not {"procedural-hrnet-clean", "procedural-adm"} <= set(shipped_models()),
    reason="the shipped default models are not in engine/weights",
)

runner = CliRunner()
COMMON = ["--scene-size", "16x32", "--sigma", "0.25", "--n0", "2", "--n", "34", "--alpha", "0.05", "--batch", "4",
          "--quiet"]
"""34 samples certify at α = 0.05 over 512 pixels (0.75^34 < 0.05 / 512); batch 4 on both sides, as the models'
kernels may differ in the last bits per batch shape."""
IMAGES = 8
"""Scenes of the in-process reference: the killing test needs enough work left when it kills."""


def bench(*args: str) -> Any:
    return runner.invoke(cli.app, cli.expand_multi_values([*COMMON, *args]))


def entries(out: Path) -> dict[str, dict[str, Any]]:
    return {f"{e['image']} {e['method']}": e for e in load_entries(out / "results.jsonl")[1]}


def same_certificates(served: dict[str, dict[str, Any]], local: dict[str, dict[str, Any]]) -> None:
    assert served, "no entries"
    for key, entry in served.items():
        assert entry["labels_sha256"] == local[key]["labels_sha256"], key
        assert entry["confusion"] == local[key]["confusion"], key
        assert entry["metrics"] == local[key]["metrics"], key
        assert entry["seed"] == local[key]["seed"] and entry["runtime"] == "triton", key


@pytest.fixture(scope="module")
def repository() -> Path:
    """``certseg serve``'s default repository (cached like theirs)."""
    from certseg.export.default_repository import default_repository

    return default_repository()


@pytest.fixture(scope="module")
def pair(repository: Path):
    """Two servers of the default repository for the module; every test needs them, so that the module skips, with
    the reason, where tritonserver cannot start (each start costs seconds: no separate probe)."""
    try:
        first = TritonServer(repository, exit_timeout_s=0).start()
    except ServerError as error:
        pytest.skip(f"tritonserver cannot start on this machine: {error}")
    with first, TritonServer(repository, exit_timeout_s=0) as second:
        yield first, second


@pytest.fixture(scope="module")
def local(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """In-process ONNX Runtime entries on the very .onnx files the servers load (not a re-export of the weights)."""
    out = tmp_path_factory.mktemp("local")
    segcertify = bench("--runtime", "onnx", "--method", "segcertify", "--images", str(IMAGES), "--segmenter",
                       str(repository / "certseg_segment_segcertify" / "1" / "segmenter.onnx"), "--out",
                       str(out / "segcertify"))
    denoisecertify = bench("--runtime", "onnx", "--method", "denoisecertify", "--images", "2", "--segmenter",
                           str(repository / "certseg_segment" / "1" / "segmenter.onnx"), "--denoiser",
                           str(repository / "certseg_denoise" / "1" / "denoiser.onnx"), "--out",
                           str(out / "denoisecertify"))
    assert segcertify.exit_code == 0 and denoisecertify.exit_code == 0, segcertify.output + denoisecertify.output
    return {**entries(out / "segcertify"), **entries(out / "denoisecertify")}


def test_two_servers_give_the_in_process_entries_and_per_server_throughput(
    pair: tuple[TritonServer, TritonServer], local: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    servers = [pair[0].grpc_address, pair[1].grpc_address]
    result = bench("--runtime", "triton", "--server", *servers, "--method", "segcertify", "denoisecertify",
                   "--images", "2", "--images-in-flight", "2", "--out", str(tmp_path), "--report")
    assert result.exit_code == 0, result.output
    served = entries(tmp_path)
    assert len(served) == 4
    same_certificates(served, local)
    assert all(e["servers"] == servers and not e["lost_servers"] for e in served.values())
    assert sum(sum(e["samples_by_server"].values()) for e in served.values()) == 4 * 36
    assert all(sum(e["samples_by_server"][s] for e in served.values()) > 0 for s in servers)
    report = (tmp_path / "report.md").read_text()
    assert "### Triton servers" in report and servers[0] in report and "images/hour" in report


def test_without_server_the_bundled_one_is_started_and_stopped_by_pid(
    repository: Path, pair: tuple[TritonServer, TritonServer], local: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    result = bench("--runtime", "triton", "--method", "segcertify", "--images", "1", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    started = [line for line in read_lines(tmp_path / "results.jsonl") if line.get("kind") == "server"]
    assert len(started) == 1 and started[0]["repository"] == str(repository)
    assert not Path(f"/proc/{started[0]['pid']}").exists()
    served = entries(tmp_path)
    assert [e["servers"] for e in served.values()] == [[started[0]["address"]]]
    same_certificates(served, local)

    # servers of another repository: one line before any sample, and the server started for it stopped all the same
    lines = read_lines(tmp_path / "results.jsonl")
    for line in lines:
        if line.get("kind") == "entry":
            line["served"]["models_sha256"] = "another repository"
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = bench("--runtime", "triton", "--method", "segcertify", "--images", "2", "--out", str(tmp_path))
    assert result.exit_code != 0 and len(result.output.strip().splitlines()) == 1, result.output
    assert "served with other model files (models_sha256)" in result.output
    started = [line for line in read_lines(tmp_path / "results.jsonl") if line.get("kind") == "server"]
    assert len(started) == 2 and not Path(f"/proc/{started[1]['pid']}").exists()


def _when(condition, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)


def _answered(server: TritonServer) -> int:
    from tritonclient.grpc import InferenceServerClient

    client = InferenceServerClient(server.grpc_address)
    try:
        return server_statistics(client, server.grpc_address, ["certseg_segcertify"]).get(
            "certseg_segcertify", {}).get("requests", 0)
    except ServerError:
        return 0
    finally:
        client.close()


def _bench_in_thread(*args: str) -> tuple[threading.Thread, dict[str, Any]]:
    outcome: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("result", bench(*args)))
    thread.start()
    return thread, outcome


def test_a_lost_server_hands_its_ranges_over_and_losing_all_keeps_a_resumable_file(
    repository: Path, pair: tuple[TritonServer, TritonServer], local: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    shared = pair[0].grpc_address
    with TritonServer(repository, exit_timeout_s=0) as doomed:
        thread, outcome = _bench_in_thread("--runtime", "triton", "--server", doomed.grpc_address, shared,
                                           "--method", "segcertify", "--images", "4", "--out", str(tmp_path))
        _when(lambda: _answered(doomed) >= 2 or not thread.is_alive())
        doomed.process.kill()  # SIGKILL to this server's own PID, mid-run
        thread.join(timeout=300)
    result = outcome["result"]
    assert result.exit_code == 0, result.output
    served = entries(tmp_path)
    same_certificates(served, local)
    assert any(doomed.grpc_address in e["lost_servers"] for e in served.values())

    with TritonServer(repository, exit_timeout_s=0) as last:
        thread, outcome = _bench_in_thread("--runtime", "triton", "--server", last.grpc_address, "--method",
                                           "segcertify", "--images", str(IMAGES), "--images-in-flight", "1",
                                           "--out", str(tmp_path))
        _when(lambda: len(entries(tmp_path)) >= 5 or not thread.is_alive())
        last.process.kill()
        thread.join(timeout=300)
    result = outcome["result"]
    lines = result.output.strip().splitlines()
    assert result.exit_code != 0 and len(lines) == 1, result.output
    assert last.grpc_address in lines[0] and "rerun to resume" in lines[0]
    kept = entries(tmp_path)
    assert 5 <= len(kept) < IMAGES

    result = bench("--runtime", "triton", "--server", shared, "--method", "segcertify", "--images", str(IMAGES),
                   "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    resumed = entries(tmp_path)
    assert len(resumed) == IMAGES and all(resumed[k]["finished_at"] == kept[k]["finished_at"] for k in kept)
    same_certificates(resumed, local)


def test_images_per_hour_and_per_server_rates_count_overlapping_entries_once() -> None:
    from certseg.bench.tables import busy_seconds, server_rows

    def entry(start: int, stop: int, samples: dict[str, int], lost: dict[str, str] | None = None) -> dict[str, Any]:
        return {"started_at": f"2026-01-01T00:00:{start:02d}+00:00",
                "finished_at": f"2026-01-01T00:00:{stop:02d}+00:00", "timings": {"total": stop - start},
                "samples_by_server": samples, "lost_servers": lost or {}}

    made = [entry(0, 10, {"a": 60, "b": 40}), entry(5, 15, {"a": 50, "b": 50}),
            entry(20, 30, {"b": 100}, {"a": "gone"})]
    assert busy_seconds(made) == 25.0  # [0, 15] and [20, 30]
    rows = {r.address: r for r in server_rows(made)}
    assert rows["b"].samples == 190 and rows["b"].samples_per_second == 190 / 25
    assert rows["a"].samples == 110 and rows["a"].samples_per_second == 110 / 15 and rows["a"].lost
    assert rows["all"].samples == 300 and rows["all"].share == 1.0 and rows["all"].images_per_hour == 3 * 3600 / 25
    assert rows["a"].images_per_hour is None
    assert server_rows([{**made[0], "samples_by_server": None}]) == []


@pytest.mark.parametrize("args, message", [
    (["--runtime", "onnx", "--server", "127.0.0.1:1"], "--server runs the models on Triton servers; it does not go "
                                                         "with --runtime onnx"),
    (["--runtime", "triton", "--baseline"], "--baseline runs the models in this process"),
    (["--server", "127.0.0.1:1", "--images-in-flight", "0"], "--images-in-flight and --in-flight must be >= 1"),
])
def test_server_options_that_cannot_work_are_one_line_before_any_server(args: list[str], message: str,
                                                                        tmp_path: Path) -> None:
    result = bench(*args, "--images", "1", "--out", str(tmp_path))
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1 and message in result.output


def test_k_step_denoising_split_across_two_servers_equals_in_process_onnx(
    repository: Path, pair: tuple[TritonServer, TritonServer], tmp_path: Path
) -> None:
    """``--denoise-steps 3``: the servers run the chain (each sample's reverse noise drawn server-side from its own
    stream), the samples split over two server processes; the entry equals in-process ONNX on the same files."""
    models = ["--segmenter", str(repository / "certseg_segment" / "1" / "segmenter.onnx"),
              "--denoiser", str(repository / "certseg_denoise" / "1" / "denoiser.onnx")]
    args = ["--method", "denoisecertify", "--denoise-steps", "3", "--images", "1"]
    local = bench("--runtime", "onnx", *args, *models, "--out", str(tmp_path / "local"))
    assert local.exit_code == 0, local.output
    servers = [pair[0].grpc_address, pair[1].grpc_address]
    served = bench("--runtime", "triton", "--server", *servers, *args, "--in-flight", "1",
                   "--out", str(tmp_path / "served"))
    assert served.exit_code == 0, served.output
    (mine,) = entries(tmp_path / "local").values()
    (theirs,) = entries(tmp_path / "served").values()
    assert theirs["denoise_steps"] == 3 and theirs["pipeline"]["denoise_timesteps"] == mine["pipeline"][
        "denoise_timesteps"]
    same_certificates({"k3": theirs}, {"k3": mine})
    assert all(theirs["samples_by_server"][s] > 0 for s in servers)  # both server processes took samples
