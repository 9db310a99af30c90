"""Shared by the certseg step models: Triton tensors <-> torch, config parameters, one response per request.

Copied beside every step's ``model.py`` (the python backend puts that folder on ``sys.path``). The maths lives
in ``certseg.engine``; this file only moves tensors. GPU instances (the gpu profile) keep tensors on the GPU
through DLPack; CPU instances go through numpy.
"""

from __future__ import annotations

import json
import math
import traceback
from collections.abc import Callable, Mapping

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import from_dlpack, to_dlpack

Outputs = Mapping[str, torch.Tensor | np.ndarray]


class Step:
    """What a step model needs from ``initialize``'s args: its config, parameters and device."""

    def __init__(self, args: Mapping[str, str]) -> None:
        self.config = json.loads(args["model_config"])
        self.model_dir = f"{args['model_repository']}/{args['model_version']}"
        gpu = args.get("model_instance_kind") == "GPU"
        self.device = torch.device("cuda", int(args.get("model_instance_device_id", 0))) if gpu else torch.device("cpu")
        self.output_types = {o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in self.config["output"]}
        threads = int(self.parameter("torch_threads", "0"))
        if threads > 0:
            torch.set_num_threads(threads)
        self.max_request_bytes = int(self.parameter("max_request_bytes", "0")) or None
        """The repository's per-request limit on one float32 tensor a step makes (None: unchecked)."""

    def check_bytes(self, what: str, shape: tuple[int, ...]) -> None:
        """Refuse, before allocating it, a float32 tensor of ``shape`` above the repository's request limit."""
        if any(int(side) < 1 for side in shape):
            raise ValueError(f"{what} must have every side >= 1, got {tuple(shape)}")
        needed = 4 * math.prod(int(side) for side in shape)
        if self.max_request_bytes is not None and needed > self.max_request_bytes:
            raise ValueError(
                f"{what} {'x'.join(map(str, shape))} float32 = {needed} bytes exceeds this repository's "
                f"max_request_bytes = {self.max_request_bytes} (certseg serve / certseg-export --max-request-bytes N)"
            )

    def parameter(self, key: str, default: str | None = None) -> str:
        value = self.config.get("parameters", {}).get(key, {}).get("string_value")
        if value is None:
            if default is None:
                raise ValueError(f"model {self.config['name']} has no parameter {key!r}")
            return default
        return value

    def tensor(self, request, name: str) -> torch.Tensor:
        """An input as a torch tensor on this instance's device (no copy where it already is)."""
        return _input(request, name).to(self.device)

    def scalar(self, request, name: str) -> int | float | bool:
        """A one-element input (seed, index, count, σ, t*) as a Python number."""
        return _input(request, name).reshape(-1)[0].item()

    def sizes(self, request, name: str) -> tuple[int, int]:
        height, width = (int(v) for v in _input(request, name).reshape(-1).tolist())
        return height, width

    def output(self, name: str, value: torch.Tensor | np.ndarray) -> pb_utils.Tensor:
        dtype = self.output_types[name]
        if isinstance(value, torch.Tensor) and value.device.type == "cuda":
            return pb_utils.Tensor.from_dlpack(name, to_dlpack(value.contiguous()))
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        return pb_utils.Tensor(name, np.ascontiguousarray(array.astype(dtype, copy=False)))

    def error(self, error: Exception) -> pb_utils.InferenceResponse:
        """A failure as that request's error response (one line); the traceback goes to the server log.

        ValueErrors (bad inputs) answer INVALID_ARG, which clients do not retry; anything else is INTERNAL.
        """
        print(traceback.format_exc(), flush=True)
        message = f"{self.config['name']}: {error.__class__.__name__}: {error}".splitlines()[0]
        code = pb_utils.TritonError.INVALID_ARG if isinstance(error, ValueError) else pb_utils.TritonError.INTERNAL
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))

    def respond(self, request, run: Callable[[object], Outputs]) -> pb_utils.InferenceResponse:
        """Run one request; a failure answers that request only, and the stub lives on."""
        try:
            with torch.inference_mode():
                outputs = run(request)
            return pb_utils.InferenceResponse([self.output(name, value) for name, value in outputs.items()])
        except Exception as error:  # noqa: BLE001 - reported to the client
            return self.error(error)


def _input(request, name: str) -> torch.Tensor:
    """An input where Triton put it: a CPU tensor over the request's memory, or a CUDA tensor via DLPack."""
    found = pb_utils.get_input_tensor_by_name(request, name)
    if found is None:
        raise ValueError(f"missing input {name}")
    return _torch(found)


def _torch(tensor) -> torch.Tensor:
    return torch.from_numpy(tensor.as_numpy()) if tensor.is_cpu() else from_dlpack(tensor.to_dlpack())


def _triton(name: str, value: torch.Tensor) -> pb_utils.Tensor:
    if value.device.type == "cuda":
        return pb_utils.Tensor.from_dlpack(name, to_dlpack(value.contiguous()))
    return pb_utils.Tensor(name, np.ascontiguousarray(value.detach().numpy()))


def bls_model(step: Step, model: str, x_t: str, timesteps: str, eps: str) -> Callable[..., torch.Tensor]:
    """Another model of the repository (the served denoiser) as ``unet(x_t, timesteps)``, called through BLS; its
    answer comes back on this instance's device. A failed call raises, failing this request only. ``x_t``,
    ``timesteps``, ``eps``: that model's input and output names."""

    def call(x: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        request = pb_utils.InferenceRequest(
            model_name=model, requested_output_names=[eps],
            inputs=[_triton(x_t, x), _triton(timesteps, steps.reshape(-1, 1).to(torch.int64))],
        )
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"{model}: {response.error().message()}")
        # A copy: the answer's buffer belongs to the response, which is released when this call returns.
        return _torch(pb_utils.get_output_tensor_by_name(response, eps)).to(step.device, copy=True)

    return call


def batched(step: Step, requests: list, inputs: tuple[str, ...], run: Callable[..., Outputs]) -> list:
    """Dynamic batching in a python model: Triton hands over a list of requests, and the model joins them.

    Requests whose inputs have equal shapes past the batch axis (always so for Triton's batcher; checked
    anyway) run through ``run`` as one concatenated batch; outputs are split back by each request's size.
    """
    responses: list = [None] * len(requests)
    groups: dict[tuple, list[tuple[int, dict[str, torch.Tensor]]]] = {}
    for i, request in enumerate(requests):
        try:
            tensors = {name: step.tensor(request, name) for name in inputs}
        except Exception as error:  # noqa: BLE001
            responses[i] = step.error(error)
            continue
        groups.setdefault(tuple(tuple(t.shape[1:]) for t in tensors.values()), []).append((i, tensors))
    for members in groups.values():
        try:
            with torch.inference_mode():
                outputs = run(**{name: torch.cat([t[name] for _, t in members]) for name in inputs})
            first = 0
            for i, tensors in members:
                last = first + len(tensors[inputs[0]])
                responses[i] = pb_utils.InferenceResponse(
                    [step.output(name, value[first:last]) for name, value in outputs.items()]
                )
                first = last
        except Exception as error:  # noqa: BLE001
            for i, _ in members:
                responses[i] = step.error(error)
    return responses


def ort_model(step: Step, input_order: tuple[str, ...] | None = None) -> Callable[..., torch.Tensor]:
    """The ONNX file named by the ``onnx_file`` parameter in certseg's ORT module: the one the in-process ORT
    runtime uses, so served and in-process label maps agree bit for bit. ``ort_threads`` caps its threads;
    ``input_order`` names the graph's inputs in the order the step passes them."""
    from certseg.engine.models.ort_module import OrtModule

    threads = int(step.parameter("ort_threads", "0"))
    return OrtModule(f"{step.model_dir}/{step.parameter('onnx_file')}", threads=threads or None,
                     input_order=input_order)


def schedule(step: Step):
    """The denoiser's noise schedule from the ``schedule`` parameter (guided-diffusion's linear one if absent)."""
    from certseg.engine.maths.denoise import LINEAR, Schedule

    text = step.parameter("schedule", "")
    if not text:
        return LINEAR
    record = json.loads(text)
    return Schedule(str(record["name"]), int(record["num_timesteps"]))
