"""certseg: certify images (in-process or against Triton servers) and serve the engine.

Thin by design: parse, validate, call the engine, write outputs. Every failure a user can cause ends in one
line on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from certseg.engine.choices import Profile, SharedMemory
from certseg.engine.commands.cli_common import (
    MaxPixelsOption,
    ThreadsOption,
    one_line_errors,
    run_cli,
    settings_options,
)
from certseg.engine.errors import CertsegError
from certseg.engine.limits import DEFAULT_MAX_PIXELS
from certseg.engine.runtimes.process import check_threads, tune_allocators
from certseg.engine.runtimes.settings import Settings

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0])


@app.callback()
def main_callback() -> None:
    """certseg: certified semantic segmentation (SegCertify / DenoiseCertify) at server scale."""


@app.command()
@one_line_errors("certseg")
@settings_options()
def certify(
    images: Annotated[list[str], typer.Argument(
        help="images to certify (PNG 8/16-bit, JPEG; RGB, RGBA or gray): files, folders (the images directly inside) "
        "or quoted glob patterns ('data/**/*.png'); one output set per image", metavar="IMAGE")],
    settings: Settings,
    seed: Annotated[int | None, typer.Option(
        help="root seed (drawn and recorded when omitted); one image file: its seed, several: image k gets "
        "image_seed(seed, k)")] = None,
    out: Annotated[Path, typer.Option(help="output folder")] = Path("certseg-out"),
    labels: Annotated[Path | None, typer.Option(
        help="ground-truth label PNG: adds accuracy and mIoU; with several images, a folder of <stem>.png")] = None,
    radius_map: Annotated[bool, typer.Option(
        "--radius-map", help="also write each pixel's own certified radius (<stem>.radius.png / .radius.npz)")
    ] = False,
    ignore_index: Annotated[int, typer.Option(help="label value ignored by the metrics")] = 255,
    skip_existing: Annotated[bool, typer.Option(
        "--skip-existing", help="skip images whose <stem>.json is already in --out (resume a run)")] = False,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
    server: Annotated[list[str] | None, typer.Option(
        "--server", help="Triton gRPC endpoint HOST:PORT running the pipeline (repeat to split the samples "
        "between servers); --segmenter/--denoiser/--runtime/--device/--precision then come from the server")] = None,
    in_flight: Annotated[int, typer.Option(help="requests in flight per --server")] = 2,
    shared_memory: Annotated[SharedMemory, typer.Option(
        help="system shared memory with --servers on this machine")] = SharedMemory.auto,
    retries: Annotated[int, typer.Option(help="retries of a failed --server batch before the run stops")] = 3,
    max_pixels: MaxPixelsOption = DEFAULT_MAX_PIXELS,
    threads: ThreadsOption = None,
) -> None:
    """Certify every pixel of each IMAGE: a class that provably holds within L2 radius R, or abstain."""
    from certseg.engine.commands.certify_command import CertifyRequest, run_certify
    from certseg.engine.commands.certify_many import ImageOutcome, Status, certify_many
    from certseg.engine.files.image_list import expand_images

    options = dict(
        radius_map=radius_map, ignore_index=ignore_index, progress=not quiet, servers=tuple(server or ()),
        in_flight=in_flight, shared_memory=shared_memory, retries=retries, max_pixels=max_pixels, threads=threads,
    )
    started = time.perf_counter()
    listed = expand_images(images)
    if listed.single_file and not skip_existing:  # one image: one line, or one error line, as always
        request = CertifyRequest(image=listed.paths[0], settings=settings, seed=seed, out=out, labels=labels,
                                 **options)
        summary = run_certify(request)
        typer.echo(summary + f" ({time.perf_counter() - started:.1f} s)")
        return

    def report(outcome: ImageOutcome) -> None:
        if outcome.status == Status.failed:
            typer.echo(f"certseg: {outcome.message}", err=True)
        else:
            typer.echo(outcome.message)

    result = certify_many(listed, settings, seed=seed, out=out, labels=labels, skip_existing=skip_existing,
                          on_image=report, **options)
    typer.echo(f"certseg: {result.summary()} ({time.perf_counter() - started:.1f} s)")
    if result.failed:
        raise typer.Exit(1)


@app.command()
@one_line_errors("certseg")
def serve(
    repository: Annotated[Path | None, typer.Option(
        help="model repository (certseg-export); default: built from the shipped models and cached")] = None,
    profile: Annotated[Profile, typer.Option(
        help="cpu: the bundled tritonserver; gpu: a tritonserver on PATH (NVIDIA's Triton container)",
    )] = Profile.cpu,
    host: Annotated[str, typer.Option(help="address to bind (0.0.0.0 opens it to the network)")] = "127.0.0.1",
    http_port: Annotated[int, typer.Option(help="HTTP port (0: a free one)")] = 8000,
    grpc_port: Annotated[int, typer.Option(help="gRPC port, the one `certseg certify --server` uses (0: free)")] = 8001,
    metrics_port: Annotated[int, typer.Option(help="Prometheus metrics port (0: a free one)")] = 8002,
    tritonserver: Annotated[Path | None, typer.Option(help="tritonserver executable to run")] = None,
    ready_timeout: Annotated[float, typer.Option(help="seconds to wait for every model to load")] = 300.0,
    max_request_bytes: Annotated[int | None, typer.Option(
        help="default repository: the most bytes of noisy images one request may make (COUNT x C x H x W float32; "
        "default 268435456); a --repository keeps the limit it was exported with")] = None,
    threads: Annotated[int | None, typer.Option(
        help="default repository: CPU threads of each Triton step instance (torch and ONNX Runtime; default: all "
        "cores); on a machine other busy processes share, pick 1 (2 threads were up to 9x slower beside one busy "
        "process, 1 stayed stable); a --repository keeps the threads it was written with")] = None,
) -> None:
    """Serve the certseg pipeline with Triton until Ctrl-C: health, metrics and gRPC/HTTP inference endpoints."""
    import signal

    from certseg.engine.runtimes.serve import TritonServer, find_tritonserver
    from certseg.export.default_repository import default_repository

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    # Ctrl-C and SIGTERM (service managers, `kill`) both stop the server cleanly, by its PID.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, interrupt)
    try:
        binary = find_tritonserver(tritonserver, prefer_path=profile == Profile.gpu)
        if profile == Profile.gpu and binary.bundled:
            raise CertsegError("the gpu profile needs NVIDIA's Triton container (onnxruntime/tensorrt backends); "
                               "the bundled tritonserver runs the cpu profile only")
        if max_request_bytes is not None and (repository is not None or max_request_bytes < 1):
            raise CertsegError("--max-request-bytes must be >= 1" if max_request_bytes < 1 else
                               "--max-request-bytes sets the default repository's limit; a --repository keeps the "
                               "one it was exported with (certseg-export --max-request-bytes N)")
        check_threads(threads)
        if threads is not None and repository is not None:
            raise CertsegError("--threads sets the default repository's step threads; a --repository keeps the "
                               "threads it was written with")
        if repository is None:
            if profile == Profile.gpu:
                raise CertsegError("the gpu profile needs --repository (certseg-export --profile gpu)")
            typer.echo("certseg: preparing the default CPU repository from the shipped models …", err=True)
            repository = default_repository(max_request_bytes=max_request_bytes, threads=threads or 0)
        server = TritonServer(repository, host=host, http_port=http_port, grpc_port=grpc_port,
                              metrics_port=metrics_port, binary=binary, ready_timeout_s=ready_timeout)
        with server:
            typer.echo(
                f"certseg: serving {repository} ({profile.value} profile, tritonserver pid {server.pid})\n"
                f"  gRPC     {server.grpc_address}   (certseg certify IMAGE --server {server.grpc_address})\n"
                f"  HTTP     {server.http_url}   (health: {server.http_url}/v2/health/ready)\n"
                f"  metrics  {server.metrics_url}\n"
                f"  log      {server.log_path}\n"
                "Ctrl-C stops the server."
            )
            while server.process is not None and server.process.poll() is None:
                time.sleep(0.5)
            code = None if server.process is None else server.process.returncode
            raise CertsegError(f"tritonserver stopped by itself (exit code {code}): {server.log_summary()}")
    except KeyboardInterrupt:
        typer.echo("certseg: stopped the server", err=True)


def main() -> None:
    tune_allocators()  # before anything imports torch or the runtime's helper thread allocates
    run_cli(app, "certseg")


if __name__ == "__main__":
    main()
