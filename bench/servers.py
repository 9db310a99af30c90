"""The Triton servers a ``--runtime triton`` bench certifies on: the ``--server``s given, or else the bundled
tritonserver serving the default CPU repository, started for the run on free loopback ports as ``certseg serve``
starts it, and stopped by its own PID when the run ends, fails or is interrupted."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from certseg.bench.config import BenchConfig
from certseg.bench.results import ResumeError
from certseg.engine.files.images import jsonable
from certseg.engine.runtimes.backends import TritonBackend
from certseg.engine.runtimes.session import Session
from certseg.engine.runtimes.settings import Settings
from certseg.engine.runtimes.triton_runtime import SAMPLE_FIELDS, TritonRuntime


@dataclass(frozen=True)
class BenchServers:
    """The gRPC addresses to connect to, and the bundled server this run started (None: the servers were given)."""

    addresses: tuple[str, ...]
    started: dict[str, Any] | None = None
    """``pid``, ``address``, ``repository`` and ``log`` of the bundled server: the results file records them."""


@contextmanager
def bench_servers(config: BenchConfig) -> Iterator[BenchServers]:
    """The run's servers; a bundled one lives exactly as long as this context (``TritonServer`` stops it by PID,
    on errors and Ctrl-C too; it also gets SIGTERM should this process die first). ``config.threads`` becomes its
    step instances' CPU threads (``certseg serve --threads``)."""
    if config.servers:
        yield BenchServers(config.servers)
        return
    from certseg.engine.runtimes.serve import TritonServer
    from certseg.export.default_repository import default_repository

    repository = default_repository(threads=config.threads or 0)
    with TritonServer(repository, exit_timeout_s=0) as server:
        yield BenchServers((server.grpc_address,), {"pid": server.pid, "address": server.grpc_address,
                                                    "repository": str(repository), "log": str(server.log_path)})


def connect(config: BenchConfig, settings: Settings, servers: BenchServers) -> TritonBackend:
    """One connection to the pool per grid cell, made before any image (an unreachable server is refused then);
    every image in flight gets its own ``Session`` over it (``Session(backend)``), so a server lost by one image's
    requests is left out by all of them."""
    return TritonBackend.connect(settings, servers.addresses, in_flight=config.in_flight,
                                 shared_memory=config.shared_memory, retries=config.retries)


def sample_fields(backend: TritonBackend) -> dict[str, Any]:
    """What the servers answer with (``SAMPLE_FIELDS``), as every served entry records it."""
    return backend.remote.pipeline.sample_fields()


def check_sample_fields(earlier: dict[str, Any] | None, backend: TritonBackend, path: Path, method: str) -> None:
    """Refuse to add entries made on servers that draw other samples, or label otherwise, than the earlier ones."""
    if earlier is None:
        return
    now = sample_fields(backend)
    for what, key in SAMPLE_FIELDS:
        if jsonable(earlier.get(key)) != jsonable(now.get(key)):
            raise ResumeError(
                f"{path} holds {method} entries served with other {what} ({key}) than "
                f"{', '.join(backend.remote.servers)} serve; use another --out, or servers of the same repository"
            )


def served_runtime(session: Session, image_size: tuple[int, int]) -> TritonRuntime | None:
    """The session's runtime for this image size where it is served (None in-process)."""
    if not isinstance(session.backend, TritonBackend):
        return None
    runtime = session.runtime_for(image_size)[1]
    return runtime if isinstance(runtime, TritonRuntime) else None


def served_record(runtime: TritonRuntime, session: Session, before: dict[str, int]) -> dict[str, Any]:
    """An entry's record of the servers: the pool, how many of its samples each answered (the client's count, for
    per-server throughput), those lost so far, and the served pipeline's ``SAMPLE_FIELDS``."""
    return {
        "device": session.device,
        "servers": list(runtime.servers),
        "samples_by_server": {address: count - before.get(address, 0)
                              for address, count in runtime.samples_served.items() if count > before.get(address, 0)},
        "lost_servers": dict(runtime.lost),
        "served": sample_fields(session.backend),
    }
