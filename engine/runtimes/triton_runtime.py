"""Triton runtime: the sampling contract answered by one or more Triton servers over gRPC.

A request carries the image once plus (root seed, first sample index, count, σ) and returns only label maps;
the server draws each sample's noise from (seed, index), so a retried request regenerates exactly the same
samples and nothing is counted twice. The sample range is cut into batches that several servers pull from,
several in flight each; label batches are yielded in index order whatever order they arrive in. Local
servers exchange the image and the label maps through system shared memory.

Requests are cut by bytes as well as by samples: no request asks for more noisy-image bytes than the servers'
``max_request_bytes`` (an ensemble parameter set by certseg-export / ``certseg serve``). Answers are checked
(shape, dtype, labels <= K) before they count, and an output region whose request failed is never reused: the
server may still write the late answer into it.
"""

from __future__ import annotations

import copy
import json
import os
import queue
import socket
import time
import uuid
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from certseg.engine.choices import SharedMemory, choice
from certseg.engine.core.contract import batch_ranges
from certseg.engine.errors import ServerError, first_line

if TYPE_CHECKING:
    from certseg.engine.models.info import ModelInfo, Role

REPOSITORY_VERSION = "3"
"""Version of the model-repository layout (``model_repository/templates/v3``) this client speaks (3: the request
carries DENOISE_STEPS, and the denoisecertify ensemble runs K denoising steps)."""
VERSION_PARAMETER = "certseg_repository_version"
ENSEMBLES: dict[str, str] = {"denoisecertify": "certseg_denoisecertify", "segcertify": "certseg_segcertify"}
"""The ensemble serving each certification method."""
LABELS = "LABELS"
@dataclass(frozen=True)
class RequestInput:
    """One input of a certseg request: its name, numpy dtype and per-request dims (-1: any)."""

    name: str
    dtype: type[np.generic]
    dims: tuple[int, ...]
    denoising_only: bool = False

    @property
    def triton_type(self) -> str:
        """The wire type name ("FP32", "UINT64", "BOOL") that tritonclient and config.pbtxt ("TYPE_…") use."""
        return {np.float32: "FP32", np.float64: "FP64", np.uint64: "UINT64", np.int64: "INT64", np.int32: "INT32",
                np.bool_: "BOOL"}[self.dtype]


REQUEST_INPUTS: tuple[RequestInput, ...] = (
    RequestInput("IMAGE", np.float32, (-1, -1, -1)),
    RequestInput("SEED", np.uint64, (1,)),
    RequestInput("START", np.int64, (1,)),
    RequestInput("COUNT", np.int32, (1,)),
    RequestInput("SIGMA", np.float64, (1,)),
    RequestInput("TIMESTEP", np.int64, (1,), denoising_only=True),
    RequestInput("DENOISE_STEPS", np.int64, (1,), denoising_only=True),
    RequestInput("SEG_SIZE", np.int32, (2,)),
    RequestInput("ANTIALIAS", np.bool_, (1,), denoising_only=True),
)
"""The request schema, the one source of the ensembles' inputs (rendered into their config.pbtxt) and of what
every client sends: the image once plus (seed, first sample index, count, σ) and the pipeline spec's t*, denoising
steps K, segmenter size and resize mode."""


def request_values(*, seed: int, start: int, count: int, sigma: float, timestep: int | None,
                   seg_size: tuple[int, int] | None, antialias: bool, denoise_steps: int = 1) -> dict[str, np.ndarray]:
    """The request's scalar inputs (all but IMAGE) as arrays of the schema's dtypes."""
    values = {"SEED": [seed], "START": [start], "COUNT": [count], "SIGMA": [sigma], "TIMESTEP": [timestep or 0],
              "DENOISE_STEPS": [denoise_steps], "SEG_SIZE": list(seg_size or (0, 0)), "ANTIALIAS": [antialias]}
    return {i.name: np.asarray(values[i.name], dtype=i.dtype) for i in REQUEST_INPUTS if i.name in values}
LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", "ip6-localhost"})
PERMANENT = frozenset({"StatusCode.INVALID_ARGUMENT", "StatusCode.NOT_FOUND", "StatusCode.UNIMPLEMENTED"})
"""gRPC statuses that a retry cannot fix (a malformed request, a missing model)."""
GONE = frozenset({"StatusCode.UNAVAILABLE"})
"""gRPC statuses of a server that is gone (connection refused or reset): while other servers of the pool remain,
it gets no more requests from this runtime, and its failed ranges go to the others without using up a retry."""
MAX_REQUEST_BYTES = "max_request_bytes"
DEFAULT_MAX_REQUEST_BYTES = 256 * 2**20
"""Default per-request limit on the noisy images a request makes (COUNT x C x H x W float32, the largest tensor of
a request at scale <= 1). The server holds several copies of them per request in flight (the request, the
ensemble's copy, the python steps' shared-memory copies; measured on CPU: about 12x the noisy bytes summed over
tritonserver and its stubs), so 256 MiB keeps one client with two requests in flight near 6 GB at the peak.
A repository that does not state its limit is assumed to have this one."""
SAMPLE_FIELDS: tuple[tuple[str, str], ...] = (
    ("repository version", VERSION_PARAMETER), ("profile", "certseg_profile"), ("engine", "engine"),
    ("precision", "precision"), ("noise backend", "noise_backend"), ("number of classes", "num_classes"),
    ("labels dtype", "labels_dtype"), ("denoiser size", "denoiser_size"), ("pipeline steps", "steps"),
    ("inputs", "inputs"), ("model files", "served_files"), ("model files", "models_sha256"), ("classes", "classes"),
    ("segmenter normalisation", "normalization"), ("segmenter input size", "segmenter_input_size"),
    ("noise schedule", "schedule"),
)
"""What every server of a pool must agree on (a retried batch can land on any of them): anything that changes
the samples or what the labels mean. (description, ensemble metadata key or ``ServedPipeline`` attribute)"""


def _grpc():
    try:
        import tritonclient.grpc as grpcclient
    except ImportError:
        raise ServerError("--server needs the Triton client: pip install 'certseg[client]'") from None
    return grpcclient


def _shm():
    from tritonclient.utils import shared_memory

    return shared_memory


def _status(error: BaseException) -> str:
    status = getattr(error, "status", None)
    return str(status() if callable(status) else status)


def parse_address(address: str) -> str:
    """``HOST:PORT`` (the gRPC port) with a clear error for anything else."""
    host, _, port = address.strip().rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ServerError(f"--server {address!r}: expected HOST:PORT (the server's gRPC port, e.g. 127.0.0.1:8001)")
    return f"{host}:{int(port)}"


def is_local(address: str) -> bool:
    """Whether the server runs on this machine (then shared memory can carry the tensors)."""
    host = address.rpartition(":")[0].strip("[]")
    if host in LOCAL_HOSTS:
        return True
    try:
        return all(info[4][0].startswith("127.") or info[4][0] == "::1" for info in socket.getaddrinfo(host, None))
    except OSError:
        return False


@dataclass(frozen=True)
class ServedPipeline:
    """What a server's ensemble config says about the pipeline it serves."""

    model: str
    address: str
    inputs: tuple[str, ...]
    steps: tuple[str, ...]
    labels_dtype: np.dtype
    num_classes: int
    max_batch: int
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def denoiser_size(self) -> tuple[int, int] | None:
        size = self.metadata.get("denoiser_size")
        return None if size is None else (int(size), int(size))

    @property
    def max_request_bytes(self) -> int:
        """The most noisy-image bytes one request may make on this server (its ``max_request_bytes``)."""
        return int(self.metadata.get(MAX_REQUEST_BYTES, DEFAULT_MAX_REQUEST_BYTES))

    def field(self, key: str) -> Any:
        """An attribute of this pipeline, else its ensemble metadata entry (``SAMPLE_FIELDS`` keys)."""
        if key == "labels_dtype":
            return self.labels_dtype.name
        if key in ("num_classes", "steps", "inputs"):
            return getattr(self, key)
        return self.metadata.get(key)

    def sample_fields(self) -> dict[str, Any]:
        """Every ``SAMPLE_FIELDS`` value by key: what decides the samples and what the labels mean, which results
        record so that a run on servers that would answer otherwise is refused (``check_pool`` across a pool)."""
        return {key: self.field(key) for _, key in SAMPLE_FIELDS}


def check_pool(pipelines: Sequence[ServedPipeline]) -> None:
    """Refuse servers that would not answer a request identically: a retried batch can land on any of them, and
    the run records the first one's settings. One line names the first field that differs and both values."""
    first = pipelines[0]
    for other in pipelines[1:]:
        for what, key in SAMPLE_FIELDS:
            mine, theirs = first.field(key), other.field(key)
            if mine != theirs:
                raise ServerError(
                    f"--server {first.address} and --server {other.address} serve different {what} ({key}: "
                    f"{_short(mine)} vs {_short(theirs)}); every --server must serve the same repository, since a "
                    "retried batch can land on any of them"
                )


def _short(value: Any, limit: int = 60) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")


def describe(client: Any, address: str, model: str, timeout_s: float = 10.0) -> ServedPipeline:
    """Check that ``address`` is up, serves ``model`` ready and at this client's repository version."""
    try:
        client.is_server_live(client_timeout=timeout_s)
    except Exception as error:  # noqa: BLE001 - every failure here means "cannot talk to it"
        raise ServerError(f"cannot reach a Triton server at {address} (gRPC): {first_line(error)}") from None
    try:
        ready = client.is_model_ready(model, client_timeout=timeout_s)
        config = client.get_model_config(model, client_timeout=timeout_s).config if ready else None
    except Exception as error:  # noqa: BLE001
        if _status(error) != "StatusCode.NOT_FOUND":
            raise ServerError(f"{address}: asking for model {model} failed: {first_line(error)}") from None
        config = None
    if config is None:
        raise ServerError(f"{address} serves no ready model {model} (serving: {_served(client, timeout_s)}); "
                          "start one with `certseg serve` or point --server at a certseg repository")
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    version = parameters.get(VERSION_PARAMETER)
    if version != REPOSITORY_VERSION:
        raise ServerError(
            f"{address} serves {model} from model-repository version {version or 'unknown'}, but this certseg "
            f"speaks version {REPOSITORY_VERSION}: rebuild the repository with this certseg's certseg-export"
        )
    metadata = {}
    for key, text in parameters.items():
        try:
            metadata[key] = json.loads(text)
        except ValueError:
            metadata[key] = text
    labels = next((o for o in config.output if o.name == LABELS), None)
    if labels is None or "num_classes" not in metadata or "max_batch" not in metadata:
        raise ServerError(f"{address}: model {model} is not a certseg ensemble (no {LABELS} output or metadata)")
    dtype = {"TYPE_UINT8": np.uint8, "TYPE_UINT16": np.uint16}
    type_name = _data_type_name(labels.data_type)
    if type_name not in dtype:
        raise ServerError(f"{address}: model {model} returns {type_name} labels, expected uint8 or uint16")
    return ServedPipeline(
        model=model, address=address, inputs=tuple(i.name for i in config.input),
        steps=tuple(step.model_name for step in config.ensemble_scheduling.step),
        labels_dtype=np.dtype(dtype[type_name]), num_classes=int(metadata["num_classes"]),
        max_batch=int(metadata["max_batch"]), metadata=metadata,
    )


def served_model(pipeline: ServedPipeline, role: str) -> ModelInfo | None:
    """The segmenter or denoiser a pipeline serves, from the ensemble's metadata (the export's records, the
    served file's sha256, classes and palette, the segmenter's normalisation and fixed input size, the
    denoiser's noise schedule: what the client's pipeline spec must use and record)."""
    from certseg.engine.models.info import ModelInfo

    prefix = {"segmenter": "certseg_segment", "denoiser": "certseg_denoise"}[role]
    step = next((name for name in pipeline.steps if name.startswith(prefix)), None)  # e.g. *_segment_segcertify
    if step is None:
        return None
    meta = pipeline.metadata
    served = (meta.get("served_files") or {}).get(step, {})
    record = meta.get(role) if isinstance(meta.get(role), dict) else {}
    if role == "segmenter":
        states: dict[str, Any] = {"num_classes": pipeline.num_classes, "input_size": meta.get("segmenter_input_size"),
                                  **{k: meta[k] for k in ("classes", "palette", "normalization") if k in meta}}
    else:
        states = {"input_size": pipeline.denoiser_size, "schedule": meta.get("schedule")}
    return ModelInfo(
        role=cast("Role", role),
        name=str(record.get("name") or served.get("file") or step),
        family=str(record.get("family") or "onnx"),
        source=f"triton://{pipeline.address}/{step}",
        sha256=str(record.get("sha256") or served.get("sha256") or ""),
        details={"served_file": served},
        served=True,
        **states,
    )


def _data_type_name(value: int) -> str:
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2.DataType.Name(value)


def _served(client: Any, timeout_s: float) -> str:
    try:
        index = client.get_model_repository_index(client_timeout=timeout_s)
        names = sorted(m.name for m in index.models if m.state == "READY")
    except Exception:  # noqa: BLE001
        return "unknown"
    return ", ".join(names) or "nothing"


@dataclass
class _Chunk:
    index: int
    start: int
    count: int
    attempts: int = 0
    not_before: float = 0.0


@dataclass(frozen=True)
class _Endpoint:
    address: str
    client: Any


@dataclass
class _Lane:
    """One server's part in one ``labels`` call: its free in-flight slots, the image input, and (local servers)
    one output shared-memory region per slot, replaced by a fresh one whenever a request on it fails."""

    endpoint: _Endpoint
    free_slots: deque[int]
    image_input: Any = None
    regions: _SharedRegions | None = None
    output_regions: dict[int, tuple[str, Any, int]] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return self.endpoint.address


class TritonRuntime:
    """The sampling contract over gRPC against ``servers`` ("HOST:PORT", the gRPC port) serving ``model``.

    ``timestep`` (t*), ``seg_size`` and ``antialias`` come from the client's ``PipelineSpec`` (``with_pipeline``
    makes a runtime for another spec on the same connections). ``batch`` samples go in each request (fewer
    where the image is so large that ``batch`` samples would exceed the servers' ``max_request_bytes``),
    ``in_flight`` requests per server at once. ``shared_memory``: "auto" uses system shared memory with
    servers on this machine and falls back to the socket if a server refuses it; "on" insists; "off" never.
    A failed request is retried ``retries`` times (on any server), then ``ServerError`` stops the run. A server
    that is gone (``GONE``) while others remain is lost for the rest of this runtime's life (``lost``), and its
    ranges go to the others; the last one left gets the retries, and its final error names the servers lost before.
    ``timeout_s`` bounds one request; at the end of a call, regions the server still uses for requests the
    client gave up on are unregistered once it is done with them, waiting at most ``drain_s``.
    """

    def __init__(
        self,
        servers: Sequence[str],
        model: str = ENSEMBLES["denoisecertify"],
        *,
        timestep: int | None = None,
        seg_size: tuple[int, int] | None = None,
        antialias: bool = False,
        denoise_steps: int = 1,
        batch: int = 16,
        in_flight: int = 2,
        shared_memory: SharedMemory | str = SharedMemory.auto,
        retries: int = 3,
        retry_delay_s: float = 0.2,
        timeout_s: float = 600.0,
        drain_s: float = 30.0,
    ) -> None:
        if not servers:
            raise ServerError("no Triton server given")
        if batch < 1 or in_flight < 1 or retries < 0:
            raise ValueError(f"batch and in_flight must be >= 1 and retries >= 0, got {batch}, {in_flight}, {retries}")
        shared_memory = choice(SharedMemory, shared_memory, "shared_memory")
        grpcclient = _grpc()
        self.model = model
        self.timestep = timestep
        self.seg_size = seg_size
        self.antialias = antialias
        self.denoise_steps = denoise_steps
        self.in_flight = in_flight
        self.shared_memory = shared_memory
        self.retries = retries
        self.retry_delay_s = retry_delay_s
        self.timeout_s = timeout_s
        self.drain_s = drain_s
        self._owner = True
        self._endpoints: list[_Endpoint] = []
        pipelines = []
        try:
            for address in dict.fromkeys(parse_address(s) for s in servers):
                self._endpoints.append(_Endpoint(address, grpcclient.InferenceServerClient(address)))
                pipelines.append(describe(self._endpoints[-1].client, address, model))
            check_pool(pipelines)
        except BaseException:
            self.close()
            raise
        self.pipelines = pipelines
        """What each server said it serves (``check_pool`` made sure they agree on everything that matters)."""
        self.pipeline = pipelines[0]
        self.batch = min(batch, *(p.max_batch for p in pipelines))
        self.max_request_bytes = min(p.max_request_bytes for p in pipelines)
        """The smallest ``max_request_bytes`` of the servers: no request makes more noisy-image bytes."""
        self.uses_shared_memory: dict[str, bool] = {}
        """Per server, whether the last ``labels`` call moved tensors through shared memory."""
        self.answered: dict[str, int] = {}
        """Per server, how many requests it answered in the last ``labels`` call (how the range was split)."""
        self.retired: dict[str, int] = {}
        """Per server, how many output regions the last ``labels`` call retired after a failed request."""
        self.samples_served: dict[str, int] = {}
        """Per server, how many samples it answered over every ``labels`` call of this runtime (not reset per call,
        so a certification's selection and estimation both count: the bench's per-server throughput)."""
        self.lost: dict[str, str] = {}
        """Servers found gone, with why; shared with the ``with_pipeline`` copies (the same connections)."""

    @property
    def servers(self) -> list[str]:
        return [e.address for e in self._endpoints]

    def with_pipeline(
        self, *, timestep: int | None, seg_size: tuple[int, int], antialias: bool = False, denoise_steps: int = 1
    ) -> TritonRuntime:
        """The same servers and connections for another pipeline spec (closing it leaves them open)."""
        other = copy.copy(self)
        other.timestep, other.seg_size, other.antialias = timestep, seg_size, antialias
        other.denoise_steps = denoise_steps
        other.uses_shared_memory, other.answered, other.retired, other.samples_served = {}, {}, {}, {}
        other._owner = False
        return other

    def __enter__(self) -> TritonRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if not self._owner:
            return
        for endpoint in self._endpoints:
            try:
                endpoint.client.close()
            except Exception:  # noqa: BLE001 - closing a dead connection
                pass
        self._endpoints = []

    def statistics(self) -> dict[str, Any]:
        """Inference statistics of the ensemble and its steps, summed over the servers (cumulative since each
        server started, over all of its clients): the per-stage timings of the served pipeline. A server that
        cannot be read is left out of this reading (whether it is gone is for the requests to find out)."""
        total: dict[str, dict[str, int]] = {}
        for endpoint in self._live():
            try:
                statistics = server_statistics(endpoint.client, endpoint.address, (self.model, *self.pipeline.steps))
            except ServerError:
                continue
            for model, counters in statistics.items():
                into = total.setdefault(model, {})
                for key, value in counters.items():
                    into[key] = into.get(key, 0) + value
        return total

    def labels(
        self, image: np.ndarray, *, sigma: float, seed: int, start: int, count: int
    ) -> Iterator[np.ndarray]:
        """Label maps of samples ``start .. start+count`` of root seed ``seed``, in index order."""
        image = np.ascontiguousarray(image, dtype=np.float32)
        if image.ndim != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"the image must be (3, H, W) RGB or (1, H, W) gray, got {image.shape}")
        if "TIMESTEP" in self.pipeline.inputs and self.timestep is None:
            raise ValueError(f"{self.model} denoises: give the timestep t*")
        if "SEG_SIZE" in self.pipeline.inputs and self.seg_size is None:
            raise ValueError(f"{self.model} needs the segmenter's input size")
        batch = self.request_batch(image.shape)
        pending = deque(_Chunk(i, first, size) for i, (first, size) in enumerate(batch_ranges(start, count, batch)))
        total = len(pending)
        if not total:
            return
        with ExitStack() as stack:
            lanes = [self._lane(endpoint, image, batch, stack) for endpoint in self._live()]
            self.answered = dict.fromkeys(self.servers, 0)
            self.retired = dict.fromkeys(self.servers, 0)
            events: queue.Queue = queue.Queue()
            done: dict[int, np.ndarray] = {}
            next_index = turn = 0
            while next_index < total:
                now = time.monotonic()
                for _ in range(len(lanes)):  # fill free slots, servers in turn, skipping chunks waiting to retry
                    lane = lanes[turn % len(lanes)]
                    turn += 1
                    while lane.free_slots and pending and pending[0].not_before <= now:
                        self._submit(lane, lane.free_slots.popleft(), pending.popleft(), sigma, seed, events)
                free = any(lane.free_slots for lane in lanes)
                try:
                    lane, slot, chunk, result, error = events.get(
                        timeout=max(1e-3, pending[0].not_before - now) if pending and free else 1.0
                    )
                except queue.Empty:
                    continue
                if error is None:
                    try:
                        done[chunk.index] = self._read(lane, slot, chunk, result, image.shape[1:])  # a copy
                        self.answered[lane.address] += 1
                        self.samples_served[lane.address] = self.samples_served.get(lane.address, 0) + chunk.count
                    except Exception as read_error:  # noqa: BLE001 - a malformed answer is a failed attempt
                        error = read_error
                if error is not None:
                    self._retire(lane, slot)  # before the slot is free again: its region is never reused
                lane.free_slots.append(slot)
                if error is not None and lane not in lanes:
                    pending.appendleft(chunk)  # sent before its server was found gone: the others take it
                elif error is not None and _status(error) in GONE and len(lanes) > 1:
                    self.lost[lane.address] = first_line(error)  # left out from now on, by every copy
                    lanes.remove(lane)
                    pending.appendleft(chunk)
                elif error is not None:
                    self._retry_or_raise(chunk, lane, error, pending, seed)
                while next_index in done:
                    yield done.pop(next_index)
                    next_index += 1

    def request_batch(self, image_shape: Sequence[int]) -> int:
        """Samples per request for an image of ``image_shape`` (C, H, W): ``batch``, or fewer so that no request
        makes more than ``max_request_bytes`` of noisy RGB images (or segmenter inputs, when they are larger).
        An image whose single sample exceeds the limit, or whose upsampled class scores (K x H x W float32, which
        the argmax step makes one sample at a time) do, is refused in one line that says how to raise it."""
        _, height, width = (int(d) for d in image_shape)
        seg_pixels = 0 if self.seg_size is None else int(self.seg_size[0]) * int(self.seg_size[1])
        per_sample = 4 * 3 * max(height * width, seg_pixels)  # float32 RGB: noisy copy or segmenter input
        scores = 4 * self.pipeline.num_classes * height * width
        if max(per_sample, scores) > self.max_request_bytes:
            tightest = min(self.pipelines, key=lambda p: p.max_request_bytes).address
            what = (f"one sample takes {per_sample} bytes (float32 3x{height}x{width}"
                    f"{f', segmenter input 3x{self.seg_size[0]}x{self.seg_size[1]}' if seg_pixels else ''})"
                    if per_sample >= scores else
                    f"its upsampled class scores take {scores} bytes per sample (float32 "
                    f"{self.pipeline.num_classes}x{height}x{width})")
            raise ServerError(
                f"this {height}x{width} image is too large for one request: {what}, more than the "
                f"{self.max_request_bytes}-byte request limit of {tightest} ({MAX_REQUEST_BYTES}); "
                "raise it where the repository is built (certseg serve --max-request-bytes N, or certseg-export "
                "--max-request-bytes N) or certify a smaller image"
            )
        return max(1, min(self.batch, self.max_request_bytes // per_sample))

    def _live(self) -> list[_Endpoint]:
        """The servers not lost; with none left, ``ServerError`` names every one and why it was lost."""
        live = [endpoint for endpoint in self._endpoints if endpoint.address not in self.lost]
        if not live:
            raise ServerError(f"no --server left: {self._lost_note()}")
        return live

    def _lost_note(self) -> str:
        return "; ".join(f"{address} lost ({why})" for address, why in list(self.lost.items()))  # other threads add

    def _retry_or_raise(self, chunk: _Chunk, lane: _Lane, error: BaseException, pending: deque, seed: int) -> None:
        chunk.attempts += 1
        what = f"samples [{chunk.start}, {chunk.start + chunk.count}) of seed {seed}"
        lost = f"; before that {self._lost_note()}" if self.lost else ""
        if _status(error) in PERMANENT:
            raise ServerError(f"{lane.address} refused {what}: {first_line(error)}{lost}")
        if chunk.attempts > self.retries:
            raise ServerError(f"{what} failed {chunk.attempts} times (last on {lane.address}): {first_line(error)}"
                              f"{lost}")
        chunk.not_before = time.monotonic() + self.retry_delay_s * 2 ** (chunk.attempts - 1)
        pending.appendleft(chunk)

    def _retire(self, lane: _Lane, slot: int) -> None:
        """After a failed request (a timeout, an error, a malformed answer), the server may still write that
        request's late answer into the slot's output region, over the labels of whichever chunk used it next:
        the same samples counted twice. So the region is retired (unregistered at the end of the call, once the
        server no longer uses it) and the slot gets a fresh one; if none can be made, it answers over the socket."""
        if slot not in lane.output_regions or lane.regions is None:
            return
        _, _, byte_size = lane.output_regions.pop(slot)  # still registered: ``release`` unregisters it
        self.retired[lane.address] += 1
        try:
            lane.output_regions[slot] = (*lane.regions.add(f"labels{slot}", byte_size), byte_size)
        except ServerError:
            pass

    def _lane(self, endpoint: _Endpoint, image: np.ndarray, batch: int, stack: ExitStack) -> _Lane:
        """The image input (shared memory or inline) and one output slot per in-flight request, each region
        sized for this image: the image's bytes, and ``batch`` label maps of its size."""
        lane = _Lane(endpoint, deque(range(self.in_flight)))
        lane.image_input = _grpc().InferInput("IMAGE", list(image.shape), REQUEST_INPUTS[0].triton_type)
        use_shm = self.shared_memory != SharedMemory.off and is_local(endpoint.address)
        if use_shm:
            lane.regions = _SharedRegions(endpoint.client, endpoint.address)
            stack.callback(lane.regions.release, self.drain_s)
            try:
                name, handle = lane.regions.add("image", image.nbytes)
                _shm().set_shared_memory_region(handle, [image])
                lane.image_input.set_shared_memory(name, image.nbytes)
                label_bytes = batch * image.shape[1] * image.shape[2] * self.pipeline.labels_dtype.itemsize
                for slot in range(self.in_flight):
                    lane.output_regions[slot] = (*lane.regions.add(f"labels{slot}", label_bytes), label_bytes)
            except ServerError:
                if self.shared_memory == SharedMemory.on:
                    raise
                use_shm = False
                lane.output_regions = {}
        if not use_shm:
            lane.image_input.set_data_from_numpy(image)
        self.uses_shared_memory[endpoint.address] = use_shm
        return lane

    def _inputs(self, lane: _Lane, chunk: _Chunk, sigma: float, seed: int) -> list[Any]:
        grpcclient = _grpc()
        values = request_values(seed=seed, start=chunk.start, count=chunk.count, sigma=sigma, timestep=self.timestep,
                                seg_size=self.seg_size, antialias=self.antialias, denoise_steps=self.denoise_steps)
        types = {i.name: i.triton_type for i in REQUEST_INPUTS}
        inputs = [lane.image_input]
        for name, array in values.items():
            if name in self.pipeline.inputs:
                tensor = grpcclient.InferInput(name, list(array.shape), types[name])
                tensor.set_data_from_numpy(array)
                inputs.append(tensor)
        return inputs

    def _submit(self, lane: _Lane, slot: int, chunk: _Chunk, sigma: float, seed: int, events: queue.Queue) -> None:
        output = _grpc().InferRequestedOutput(LABELS)
        if slot in lane.output_regions:
            name, _, size = lane.output_regions[slot]
            output.set_shared_memory(name, size)

        def done(result: Any, error: Any) -> None:
            events.put((lane, slot, chunk, result, error))

        try:
            lane.endpoint.client.async_infer(
                self.model, self._inputs(lane, chunk, sigma, seed), done, outputs=[output],
                client_timeout=self.timeout_s,
            )
        except Exception as error:  # noqa: BLE001 - a failure to send is a failed attempt
            events.put((lane, slot, chunk, None, error))

    def _read(self, lane: _Lane, slot: int, chunk: _Chunk, result: Any, size: Sequence[int]) -> np.ndarray:
        """The chunk's label maps, checked to be the ones asked for before they count: ``count`` maps of the
        image's size, in the served dtype, every label a class or the invalid label K."""
        if slot not in lane.output_regions:
            labels = result.as_numpy(LABELS)
            if labels is None:
                raise ServerError(f"{lane.address} answered without {LABELS}")
        else:
            response = result.get_output(LABELS)
            if response is None:
                raise ServerError(f"{lane.address} answered without {LABELS}")
            shape = tuple(int(d) for d in response.shape)
            self._check_shape(lane, chunk, shape, size)
            _, handle, _ = lane.output_regions[slot]
            labels = _shm().get_contents_as_numpy(handle, self.pipeline.labels_dtype, list(shape)).copy()
        return self._checked(lane, chunk, labels, size)

    def _check_shape(self, lane: _Lane, chunk: _Chunk, shape: tuple[int, ...], size: Sequence[int]) -> None:
        expected = (chunk.count, int(size[0]), int(size[1]))
        if shape != expected:
            raise ServerError(f"{lane.address} answered {LABELS} of shape {shape} for samples [{chunk.start}, "
                              f"{chunk.start + chunk.count}), expected {expected}")

    def _checked(self, lane: _Lane, chunk: _Chunk, labels: np.ndarray, size: Sequence[int]) -> np.ndarray:
        self._check_shape(lane, chunk, tuple(labels.shape), size)
        if labels.dtype != self.pipeline.labels_dtype:
            raise ServerError(f"{lane.address} answered {labels.dtype} labels, expected {self.pipeline.labels_dtype}")
        largest = int(labels.max()) if labels.size else 0
        if largest > self.pipeline.num_classes:  # K itself is the invalid label (non-finite outputs)
            raise ServerError(f"{lane.address} answered label {largest} for samples [{chunk.start}, "
                              f"{chunk.start + chunk.count}), but there are {self.pipeline.num_classes} classes")
        return labels


class _SharedRegions:
    """System shared-memory regions of one ``labels`` call, registered with one server; released together.

    A region is unregistered only when the server no longer uses it: Triton refuses ("currently in use") while a
    request that names it is in flight, such as one the client gave up on; ``release`` waits for those."""

    def __init__(self, client: Any, address: str) -> None:
        self.client = client
        self.address = address
        self.prefix = f"certseg_{os.getpid()}_{uuid.uuid4().hex[:12]}"
        self.handles: list[Any] = []
        self.registered: list[str] = []
        self.made = 0

    def add(self, role: str, byte_size: int) -> tuple[str, Any]:
        """A new region of ``byte_size`` bytes, registered with the server: (its name there, its handle).
        Names are never reused within a call, so a late write can only reach the region it was meant for."""
        self.made += 1
        name = f"{self.prefix}_{role}_{self.made}"
        try:
            self.handles.append(_shm().create_shared_memory_region(name, f"/{name}", byte_size, create_only=True))
        except Exception as error:  # noqa: BLE001
            raise ServerError(f"cannot create shared memory for {self.address}: {first_line(error)}") from None
        try:
            self.client.register_system_shared_memory(name, f"/{name}", byte_size)
        except Exception as error:  # noqa: BLE001
            raise ServerError(f"{self.address} cannot use this machine's shared memory: {first_line(error)}") from None
        self.registered.append(name)
        return name, self.handles[-1]

    def release(self, drain_s: float = 30.0) -> None:
        """Unregister every region (waiting up to ``drain_s`` while the server still uses one), then destroy
        this process's mappings. A region the server still uses after that stays registered there; destroying
        our side is safe either way (the server keeps its own mapping)."""
        deadline = time.monotonic() + drain_s
        for name in self.registered:
            while not self._unregister(name) and time.monotonic() < deadline:
                time.sleep(0.05)
        for handle in self.handles:
            _shm().destroy_shared_memory_region(handle)
        self.handles, self.registered = [], []

    def _unregister(self, name: str) -> bool:
        """True when done (or pointless: the server is gone); False while the server still uses the region."""
        try:
            self.client.unregister_system_shared_memory(name, client_timeout=5.0)
        except Exception as error:  # noqa: BLE001 - the server may be gone
            return "in use" not in first_line(error)
        return True


def server_statistics(client: Any, address: str, models: Sequence[str] | None = None,
                      timeout_s: float = 10.0) -> dict[str, dict[str, int]]:
    """Per-model inference statistics of one server: request and execution counts and total nanoseconds per
    phase (queue, compute_input, compute_infer, compute_output), cumulative since the server started."""
    try:
        stats = client.get_inference_statistics(client_timeout=timeout_s)
    except Exception as error:  # noqa: BLE001
        raise ServerError(f"cannot read statistics from {address}: {first_line(error)}") from None
    out: dict[str, dict[str, int]] = {}
    for model in stats.model_stats:
        if models is not None and model.name not in models:
            continue
        infer = model.inference_stats
        out[model.name] = {
            "requests": int(infer.success.count),
            "executions": int(model.execution_count),
            "inferences": int(model.inference_count),
            **{f"{phase}_ns": int(getattr(infer, phase).ns)
               for phase in ("success", "queue", "compute_input", "compute_infer", "compute_output")},
        }
    return out


def statistics_delta(after: Mapping[str, Any], before: Mapping[str, Any]) -> dict[str, Any]:
    """``after - before`` per model and counter (statistics are cumulative since the server started); never below
    0, as a server lost between the two readings drops out of ``after`` (its part of that interval is then missing)."""
    return {
        model: {key: max(0, value - before.get(model, {}).get(key, 0)) for key, value in counters.items()}
        for model, counters in after.items()
    }


def stage_timings(statistics: Mapping[str, Mapping[str, int]]) -> dict[str, dict[str, float]]:
    """Statistics as a small report per model: requests, executions (batches the model ran), and milliseconds
    spent queued, moving inputs, computing and moving outputs."""
    return {
        model: {
            "requests": counters["requests"],
            "executions": counters["executions"],
            "inferences": counters["inferences"],
            **{f"{phase}_ms": counters[f"{phase}_ns"] / 1e6
               for phase in ("queue", "compute_input", "compute_infer", "compute_output")},
        }
        for model, counters in statistics.items()
    }
