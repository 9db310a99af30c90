"""Start and stop a Triton server for a certseg model repository: the bundled one or a ``tritonserver`` on PATH.

    with TritonServer("repo") as server:      # 127.0.0.1, free ports, waits until every model is ready
        print(server.grpc_address)            # -> TritonRuntime([server.grpc_address], ...)

The ``nvidia-pytriton`` wheel ships a real tritonserver with the python backend only. Its backend folder is
copied to a cache folder (never modified in site-packages) with the python stub matching this interpreter,
and the server runs with this interpreter's folder first on PATH, so the stub imports certseg from the same
environment. The server is stopped by its own PID (SIGTERM, then SIGKILL after a grace period), nothing else.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from certseg.engine.cache import cache_dir
from certseg.engine.errors import ServerError

LOCALHOST = "127.0.0.1"
_LOG_NOISE = ("NVML", "DCGM", "CudaDriverHelper", "CUDA driver", "cuda driver")
"""Error lines every start on a machine without a GPU logs; never the reason a start failed."""
_GLOG_LINE = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+\s+[^\]\s]+\]\s?(.*)$")
"""tritonserver's log lines: severity (Info, Warning, Error, Fatal), mmdd time thread file:line] message."""
_PLAIN_ERROR = re.compile(r"^(?:(?:error|fatal)\b|\w*(?:Error|Exception): )", re.IGNORECASE)
"""Error lines without a log prefix: "error: creating server: ...", a Python exception's last line."""


def error_message(line: str) -> str | None:
    """The message of an error line of a tritonserver log (first line, quotes stripped); None for any other
    line: info and warning lines, GPU-monitoring noise of CPU-only machines, Python warnings."""
    text = line.strip()
    glog = _GLOG_LINE.match(text)
    if glog is not None:
        if glog.group(1) not in ("E", "F"):
            return None
        text = glog.group(2)
    elif not _PLAIN_ERROR.match(text) or "Warning: " in text:
        return None
    message = text.strip().strip('"').split("\\n", 1)[0].strip().rstrip('"').strip()
    if not message or any(noise in message for noise in _LOG_NOISE):
        return None
    return message


@dataclass(frozen=True)
class TritonBinary:
    """A tritonserver executable and what it needs to run: a backend folder and library path (bundled only)."""

    executable: Path
    bundled: bool
    backend_dir: Path | None = None
    library_dirs: tuple[Path, ...] = ()


def bundled_root() -> Path | None:
    """``site-packages/pytriton/tritonserver`` of the installed nvidia-pytriton, if any."""
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    return root if (root / "bin" / "tritonserver").is_file() else None


def prepare_backends(root: Path, target_root: Path | None = None) -> Path:
    """A writable copy of the bundled backends with the python stub for this interpreter beside the backend.

    Built once per pytriton install and Python version, in a temporary folder renamed into place.
    """
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"the bundled tritonserver has no python backend stub for Python {version} ({stub})")
    stamp = f"{root.stat().st_mtime_ns}-{version}"
    target = (target_root or cache_dir() / "triton-backends") / stamp
    if (target / "python" / "triton_python_backend_stub").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".backends.", dir=target.parent))
    try:
        shutil.copytree(root / "backends", staging, dirs_exist_ok=True)
        shutil.copy2(stub, staging / "python" / "triton_python_backend_stub")
        try:
            staging.rename(target)
        except OSError:  # another process won the race; its copy is identical
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def find_tritonserver(explicit: str | os.PathLike | None = None, *, prefer_path: bool = False) -> TritonBinary:
    """``explicit``, else the bundled server (or a ``tritonserver`` on PATH first when ``prefer_path``)."""
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise ServerError(f"tritonserver {path} does not exist")
        root = bundled_root()
        if root is not None and path.resolve() == (root / "bin" / "tritonserver").resolve():
            return _bundled(root)
        return TritonBinary(path, bundled=False)
    on_path = shutil.which("tritonserver")
    root = bundled_root()
    if on_path and (prefer_path or root is None):
        return TritonBinary(Path(on_path), bundled=False)
    if root is not None:
        return _bundled(root)
    raise ServerError("no tritonserver found: pip install 'certseg[serve]' (bundled CPU server) or run inside "
                      "NVIDIA's Triton container")


def _bundled(root: Path) -> TritonBinary:
    libs = root.parent.parent / "nvidia_pytriton.libs"
    return TritonBinary(
        root / "bin" / "tritonserver", bundled=True, backend_dir=prepare_backends(root),
        library_dirs=(libs,) if libs.is_dir() else (),
    )


def free_ports(count: int, host: str = LOCALHOST, *, taken: Sequence[int] = ()) -> list[int]:
    """``count`` distinct ports free on ``host`` now, none of them in ``taken``.

    Every probe socket stays bound until all are picked: probing one port at a time let the kernel hand out the
    same port twice (HTTP and metrics on one port, which tritonserver refuses to start with).
    """
    ports: list[int] = []
    with contextlib.ExitStack() as probes:
        while len(ports) < count:
            probe = probes.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            probe.bind((host, 0))
            port = int(probe.getsockname()[1])
            if port not in taken:
                ports.append(port)
    return ports


def free_port(host: str = LOCALHOST) -> int:
    return free_ports(1, host)[0]


def _running(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie waiting for its reaper has finished)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the process that started the server dies (Linux)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class TritonServer:
    """A tritonserver process serving ``repository`` on ``host``; a context manager that stops it by PID.

    Ports default to free ones (0). ``start`` waits for ``/v2/health/ready`` (every model loaded) for at most
    ``ready_timeout_s`` and raises ``ServerError`` with the last lines of the server log otherwise. On stop,
    tritonserver waits ``exit_timeout_s`` for in-flight requests and model unloading (python-backend models
    take about 5 s to unload; 0 exits at once, and their stubs follow within a second).
    ``grpc_infer_pool``: how many finished gRPC request/response objects tritonserver keeps for reuse (its
    ``--grpc-infer-allocation-pool-size``, default 8 there). Each keeps the buffers of its tensors, an image per
    request, so with the default the server's memory grew by about an image per request (measured: 0.5 → 1.1 GB
    over six 3000x3000 requests; flat with 0). 0 keeps none; re-allocating them costs microseconds per request.
    """

    def __init__(
        self,
        repository: str | os.PathLike,
        *,
        host: str = LOCALHOST,
        http_port: int = 0,
        grpc_port: int = 0,
        metrics_port: int = 0,
        binary: TritonBinary | None = None,
        log_path: str | os.PathLike | None = None,
        ready_timeout_s: float = 120.0,
        exit_timeout_s: int = 5,
        grace_s: float = 15.0,
        grpc_infer_pool: int = 0,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.repository = Path(repository).resolve()
        if not self.repository.is_dir():
            raise ServerError(f"model repository {self.repository} does not exist")
        self.host = host
        given = (http_port, grpc_port, metrics_port)
        picked = iter(free_ports(given.count(0) + given.count(None), taken=[p for p in given if p]))
        self.http_port = http_port or next(picked)
        self.grpc_port = grpc_port or next(picked)
        self.metrics_port = metrics_port or next(picked)
        self.binary = binary or find_tritonserver()
        self.ready_timeout_s = ready_timeout_s
        self.exit_timeout_s = exit_timeout_s
        self.grace_s = grace_s
        self.grpc_infer_pool = grpc_infer_pool
        self.extra_args = tuple(extra_args)
        self._owns_log = log_path is None
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="tritonserver-", suffix=".log")[1])
        self.shm_prefix = f"certseg{os.getpid()}x{id(self) & 0xFFFFFF:x}_"
        self.process: subprocess.Popen | None = None

    @property
    def grpc_address(self) -> str:
        return f"{self._client_host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self._client_host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host}:{self.metrics_port}/metrics"

    @property
    def _client_host(self) -> str:
        return LOCALHOST if self.host in ("0.0.0.0", "") else self.host

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def command(self) -> list[str]:
        args = [
            str(self.binary.executable),
            f"--model-repository={self.repository}",
            f"--http-address={self.host}", f"--http-port={self.http_port}",
            f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            f"--grpc-infer-allocation-pool-size={self.grpc_infer_pool}",
            "--disable-auto-complete-config",
        ]
        if self.binary.backend_dir is not None:
            args.append(f"--backend-directory={self.binary.backend_dir}")
            args.append(f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}")
        return args + list(self.extra_args)

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        # The python backend's stub imports packages from the first python3 on PATH: this interpreter's.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        if self.binary.library_dirs:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(
                [*map(str, self.binary.library_dirs), *filter(None, [env.get("LD_LIBRARY_PATH")])]
            )
        return env

    def start(self) -> TritonServer:
        if self.process is not None:
            return self
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=self.environment(), start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                code = None if self.process is None else self.process.returncode
                raise ServerError(f"tritonserver exited with code {code} before it was ready: {self.log_summary()}")
            if self.is_ready():
                return
            time.sleep(0.1)
        raise ServerError(f"tritonserver was not ready after {self.ready_timeout_s:.0f} s: {self.log_summary()}")

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=1.0) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, lines: int = 20) -> list[str]:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        return [line for line in text.splitlines() if line.strip()][-lines:]

    def log_summary(self) -> str:
        """What went wrong, in one line: the last error lines of the log (the first line of each, without the
        CPU-only machine's GPU-monitoring noise), plus the log's path. Never a warning or info line: those are
        not why a server failed."""
        picked = []
        for line in self.log_tail(60):
            message = error_message(line)
            if message is not None and message not in picked:
                picked.append(message)
        reason = " | ".join(picked[-2:]) or "no error line in the log"
        return f"{reason} (log: {self.log_path})"

    def stop(self) -> None:
        """SIGTERM to our server's PID, SIGKILL after the grace period; then remove its leftovers."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=self.grace_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._kill_orphaned_stubs()
        self._remove_shared_memory()

    def stub_pids(self) -> list[int]:
        """PIDs of the python-backend stubs this server started: their command line carries our region prefix."""
        if self.binary.backend_dir is None or not Path("/proc").is_dir():
            return []
        marker = self.shm_prefix.encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    cmdline = (entry / "cmdline").read_bytes()
                    if b"triton_python_backend_stub" in cmdline and marker in cmdline:
                        pids.append(int(entry.name))
        return pids

    def _kill_orphaned_stubs(self, wait_s: float = 5.0) -> None:
        """A killed server can leave a stub behind (one busy when it died); the server is gone, so SIGKILL."""
        pids = self.stub_pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + wait_s
        while pids and time.monotonic() < deadline:
            pids = [pid for pid in pids if _running(pid)]
            time.sleep(0.05)

    def _remove_shared_memory(self) -> None:
        """Regions the python backend leaves in /dev/shm when the server is killed (named with our prefix)."""
        shm = Path("/dev/shm")
        if self.binary.backend_dir is None or not shm.is_dir():
            return
        for path in shm.glob(f"{self.shm_prefix}*"):
            with contextlib.suppress(OSError):
                path.unlink()

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self._owns_log and exc[0] is None:
            with contextlib.suppress(OSError):
                self.log_path.unlink()
