"""Serving throughput on this machine: samples/s of one label pipeline run in-process and through Triton.

    python -m certseg.bench.serving [--samples 256] [--batch 16] [--in-flight 2] [--method denoisecertify]

One run, one table: in-process PyTorch, in-process ONNX Runtime, and the bundled tritonserver (CPU profile)
over HTTP, gRPC and gRPC with system shared memory, all on the same image (the shipped sample), seed and
ONNX files. Then where the served time goes, per ensemble step (Triton's own statistics). The default models
are the shipped ones; without shipped weights the same architectures run with random weights (same cost),
and the table says so. A benchmark, not a test: the numbers depend on the machine and its load.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import torch
import typer
from rich.console import Console
from rich.table import Table

from certseg.engine.choices import Method
from certseg.engine.commands.cli_common import one_line_errors, run_cli
from certseg.engine.core.sampling import Runtime, batch_ranges
from certseg.engine.errors import CheckpointError
from certseg.engine.files.images import read_image
from certseg.engine.maths.label_pipeline import LabelPipeline, PipelineSpec, make_spec
from certseg.engine.models.registry import LoadedModel, default_model, load_model
from certseg.engine.runtimes.onnx_runtime import onnx_runtime
from certseg.engine.runtimes.torch_runtime import torch_runtime
from certseg.engine.runtimes.triton_runtime import (
    ENSEMBLES,
    REQUEST_INPUTS,
    TritonRuntime,
    request_values,
    stage_timings,
    statistics_delta,
)

if TYPE_CHECKING:
    from certseg.export.model_files import ModelFiles

SAMPLE = Path(str(resources.files("certseg.examples") / "street.png"))
"""The shipped sample scene, package data: found in any installation, not only in a source checkout."""
SEED = 20250101
app = typer.Typer(add_completion=False, help=__doc__.split("\n")[0])


def default_models(method: Method) -> tuple[LoadedModel, LoadedModel | None, bool]:
    """The shipped defaults, or (False) the same architectures with random weights when none are shipped."""
    try:
        segmenter = load_model(default_model("segmenter", method), "segmenter")
        denoising = method == Method.denoisecertify
        denoiser = load_model(default_model("denoiser", method), "denoiser") if denoising else None
        return segmenter, denoiser, True
    except CheckpointError:
        return *_random_models(method), False


def _random_models(method: Method) -> tuple[LoadedModel, LoadedModel | None]:
    from certseg.engine.models.adm import build_adm
    from certseg.engine.models.hrnet import build_hrnet
    from certseg.training import scenes
    from certseg.training.architectures import SMALL_ADM, SMALL_HRNET

    torch.manual_seed(0)
    segmenter = LoadedModel(
        module=build_hrnet(SMALL_HRNET, scenes.NUM_CLASSES).eval(), name="random-small-hrnet", family="hrnet",
        role="segmenter", config={"model_cfg": SMALL_HRNET, "num_classes": scenes.NUM_CLASSES},
        source="random weights", sha256="",
    )
    denoiser = None
    if method == Method.denoisecertify:
        denoiser = LoadedModel(
            module=build_adm(SMALL_ADM).eval(), name="random-small-adm", family="adm", role="denoiser",
            config={"create_model_kwargs": SMALL_ADM}, source="random weights", sha256="",
        )
    return segmenter, denoiser


def timed(runtime: Runtime, image: np.ndarray, sigma: float, samples: int, warmup: int) -> float:
    """Samples per second of ``samples`` samples after ``warmup`` samples (first calls load and compile)."""
    for _ in runtime.labels(image, sigma=sigma, seed=SEED, start=0, count=warmup):
        pass
    started = time.perf_counter()
    got = sum(len(batch) for batch in runtime.labels(image, sigma=sigma, seed=SEED, start=warmup, count=samples))
    elapsed = time.perf_counter() - started
    if got != samples:
        raise RuntimeError(f"asked for {samples} samples, got {got}")
    return samples / elapsed


class HttpRuntime:
    """The served pipeline over Triton's HTTP/REST endpoint (JSON header + binary tensors), ``in_flight``
    requests at once, in index order: the HTTP row of the table (the engine's client speaks gRPC)."""

    def __init__(self, url: str, model: str, spec: PipelineSpec, batch: int, in_flight: int) -> None:
        import tritonclient.http as httpclient

        self.http = httpclient
        self.client = httpclient.InferenceServerClient(url, concurrency=in_flight, network_timeout=600.0)
        self.model, self.spec, self.batch, self.in_flight = model, spec, batch, in_flight
        self.inputs = {i["name"] for i in self.client.get_model_metadata(model)["inputs"]}

    def _request(self, image: np.ndarray, sigma: float, seed: int, start: int, count: int):
        spec = self.spec
        values = {"IMAGE": np.ascontiguousarray(image, np.float32), **request_values(
            seed=seed, start=start, count=count, sigma=sigma, timestep=spec.timestep.t if spec.timestep else None,
            seg_size=spec.segmenter_size, antialias=spec.antialias)}
        types = {i.name: i.triton_type for i in REQUEST_INPUTS}
        inputs = []
        for name, array in values.items():
            if name in self.inputs:
                tensor = self.http.InferInput(name, list(array.shape), types[name])
                tensor.set_data_from_numpy(array, binary_data=True)
                inputs.append(tensor)
        outputs = [self.http.InferRequestedOutput("LABELS", binary_data=True)]
        return self.client.async_infer(self.model, inputs, outputs=outputs)

    def labels(self, image: np.ndarray, *, sigma: float, seed: int, start: int, count: int) -> Iterator[np.ndarray]:
        waiting = []
        for first, size in batch_ranges(start, count, self.batch):
            waiting.append(self._request(image, sigma, seed, first, size))
            if len(waiting) >= self.in_flight:
                yield waiting.pop(0).get_result().as_numpy("LABELS")
        for request in waiting:
            yield request.get_result().as_numpy("LABELS")

    def close(self) -> None:
        self.client.close()


def export_onnx(segmenter: LoadedModel, denoiser: LoadedModel | None, folder: Path, image_size: tuple[int, int],
                batch: int) -> ModelFiles:
    """The fp32 graphs every ONNX Runtime row serves, in-process and on Triton."""
    from certseg.export.models import export_models

    return export_models(segmenter, denoiser, folder, image_size=image_size, max_batch=batch, fp16=False,
                         tensorrt=False).model_files()


@app.command()
@one_line_errors("certseg-bench")
def main(
    samples: Annotated[int, typer.Option(help="timed samples per runtime")] = 256,
    warmup: Annotated[int, typer.Option(help="untimed samples first (loads, first-call costs)")] = 32,
    batch: Annotated[int, typer.Option(help="samples per forward pass / request")] = 16,
    in_flight: Annotated[int, typer.Option(help="requests in flight (Triton rows)")] = 2,
    method: Annotated[Method, typer.Option(help="denoise first, or not")] = Method.denoisecertify,
    sigma: Annotated[float, typer.Option(help="noise level")] = 0.25,
    image_path: Annotated[Path, typer.Option("--image", help="image to sample around")] = SAMPLE,
    instances: Annotated[int, typer.Option(help="Triton instances of the denoise and segment steps")] = 1,
    threads: Annotated[int, typer.Option(help="torch/ORT threads per Triton step (0: all cores)")] = 0,
    json_out: Annotated[Path | None, typer.Option("--json", help="also write the numbers here")] = None,
) -> None:
    """Measure samples/s: in-process PyTorch and ORT, Triton over HTTP, gRPC and gRPC + shared memory."""
    from certseg.engine.runtimes.serve import TritonServer
    from certseg.export.repository import write_repository

    console = Console(highlight=False, width=max(Console().width, 110))
    image = read_image(image_path)
    size = (int(image.shape[1]), int(image.shape[2]))
    segmenter, denoiser, shipped = default_models(method)
    spec = make_spec(method, sigma, size, denoiser_size=None if denoiser is None else denoiser.input_size)
    rows: list[tuple[str, float]] = []
    stages: dict[str, Any] = {}

    def measure(name: str, make: Callable[[], Any]) -> None:
        runtime = make()
        try:
            rows.append((name, timed(runtime, image, sigma, samples, warmup)))
        finally:
            if hasattr(runtime, "close"):
                runtime.close()
        console.print(f"  {name}: {rows[-1][1]:.1f} samples/s")

    with tempfile.TemporaryDirectory(prefix="certseg-serving-") as tmp:
        folder = Path(tmp)
        console.print("exporting ONNX …")
        exported = export_onnx(segmenter, denoiser, folder / "onnx", size, batch)
        pipeline = LabelPipeline(spec, segmenter.module, None if denoiser is None else denoiser.module)
        measure("in-process PyTorch", lambda: torch_runtime(pipeline, device=torch.device("cpu"),
                                                            batch_size=batch))
        measure("in-process ONNX Runtime", lambda: onnx_runtime(spec, exported.segmenter, exported.denoiser,
                                                                batch_size=batch))
        repository = write_repository(exported, folder / "repository", max_batch=batch, instances=instances,
                                      threads=threads)
        console.print("starting the bundled tritonserver …")
        with TritonServer(repository, exit_timeout_s=0) as server:
            model = ENSEMBLES[method]
            remote: dict[str, Any] = {"timestep": spec.timestep.t if spec.timestep else None,
                                      "seg_size": spec.segmenter_size, "antialias": spec.antialias,
                                      "batch": batch, "in_flight": in_flight}
            measure("Triton HTTP", lambda: HttpRuntime(server.http_url.removeprefix("http://"), model, spec,
                                                        batch, in_flight))
            measure("Triton gRPC", lambda: TritonRuntime([server.grpc_address], model, shared_memory="off",
                                                         **remote))
            probe = TritonRuntime([server.grpc_address], model, **remote)
            before = probe.statistics()
            measure("Triton gRPC + shared memory", lambda: TritonRuntime([server.grpc_address], model,
                                                                         shared_memory="on", **remote))
            stages = stage_timings(statistics_delta(probe.statistics(), before))
            probe.close()

    console.print(_table(rows, method, segmenter, denoiser, shipped, size, batch, in_flight, samples))
    console.print(_stage_table(stages, samples + warmup))
    if json_out is not None:
        json_out.write_text(json.dumps({"samples_per_second": dict(rows), "server_stages": stages,
                                        "method": method, "image_size": list(size), "batch": batch,
                                        "in_flight": in_flight, "shipped_weights": shipped}, indent=2) + "\n")


def _table(rows: list[tuple[str, float]], method: Method, segmenter: LoadedModel, denoiser: LoadedModel | None,
           shipped: bool, size: tuple[int, int], batch: int, in_flight: int, samples: int) -> Table:
    import os

    models = segmenter.name + ("" if denoiser is None else f" + {denoiser.name}")
    weights = "shipped weights" if shipped else "random weights, same architectures"
    table = Table(title=f"{method}, {models} ({weights}); {size[0]}x{size[1]} image, batch {batch}, "
                        f"{in_flight} in flight, {samples} samples, {os.cpu_count()} CPU cores")
    table.add_column("runtime")
    table.add_column("samples/s", justify="right")
    table.add_column("vs PyTorch", justify="right")
    base = rows[0][1] if rows else 1.0
    for name, rate in rows:
        table.add_row(name, f"{rate:.1f}", f"{rate / base:.2f}x")
    return table


def _stage_table(stages: dict[str, Any], samples: int) -> Table:
    """Per ensemble step, in pipeline order: requests, executions (fewer than requests when the dynamic
    batcher joined requests), and milliseconds queued, computing and moving tensors in and out."""
    table = Table(title="where the served time goes (the gRPC + shared memory run, from Triton's statistics)")
    table.add_column("step", no_wrap=True)
    for column in ("requests", "executions", "queue ms", "compute ms", "in+out ms", "compute ms/sample"):
        table.add_column(column, justify="right")
    for model, row in sorted(stages.items(), key=lambda item: _ORDER.index(item[0]) if item[0] in _ORDER else 99):
        table.add_row(model, str(row["requests"]), str(row["executions"]), f"{row['queue_ms']:.0f}",
                      f"{row['compute_infer_ms']:.0f}", f"{row['compute_input_ms'] + row['compute_output_ms']:.0f}",
                      f"{row['compute_infer_ms'] / max(samples, 1):.2f}")
    return table


_ORDER = ("certseg_noise", "certseg_scale", "certseg_denoise", "certseg_resize", "certseg_prepare", "certseg_segment",
          "certseg_segment_segcertify", "certseg_argmax", "certseg_denoisecertify", "certseg_segcertify")


if __name__ == "__main__":
    run_cli(app, "certseg-bench")
