"""Write a Triton model repository for the certseg pipeline from the versioned templates in ``model_repository/``.

    write_repository(export_result, "repo", profile="cpu")   # bundled tritonserver: python steps, ORT inside
    write_repository(export_result, "repo", profile="gpu")   # NVIDIA's container: onnxruntime_onnx / tensorrt_plan

Templates live in ``model_repository/templates/v<N>/``: ``common/`` (the python steps and the two ensembles),
``cpu/`` and ``gpu/`` (the two model steps, which differ by profile) and ``python/`` (the step models' code,
copied beside each python step's config). Every rendered ``config.pbtxt`` is parsed with Triton's own protobuf
schema (``tritonclient.grpc.model_config_pb2.ModelConfig``) before anything is moved into place.

Any ONNX files that meet certseg's model contract (``certseg.engine.models.onnx_model``) are served as given:
their own input and output names are rendered into the configs, the segmenter's normalisation into the steps
that prepare its input, the denoiser's schedule into the steps that use ᾱ, and the ensembles' metadata says
both, so clients build the same pipeline spec and record it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import string
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from certseg.engine.choices import NoiseBackend, Profile, choice
from certseg.engine.digest import file_sha256
from certseg.engine.labels import label_numpy_dtype
from certseg.engine.maths.denoise import LINEAR, Schedule
from certseg.engine.maths.stages import IMAGENET, Normalization
from certseg.engine.models import facts
from certseg.engine.models.onnx_model import denoiser_contract, segmenter_contract
from certseg.engine.runtimes.triton_runtime import (
    DEFAULT_MAX_REQUEST_BYTES,
    MAX_REQUEST_BYTES,
    REPOSITORY_VERSION,
    REQUEST_INPUTS,
    VERSION_PARAMETER,
)
from certseg.export.model_files import ModelFiles, ProvidesModelFiles, RepositoryError, model_files
from certseg.export.onnx_files import external_data_files

GpuEngine = Literal["onnxruntime", "tensorrt"]

STEPS: dict[str, tuple[str, ...]] = {
    "certseg_denoisecertify": (
        "certseg_noise", "certseg_scale", "certseg_denoise", "certseg_chain", "certseg_resize", "certseg_segment",
        "certseg_argmax",
    ),
    "certseg_segcertify": ("certseg_noise", "certseg_prepare", "certseg_segment", "certseg_argmax"),
}
"""The step models of each ensemble, in pipeline order."""

STEP_HELPER = "certseg_step.py"
METADATA_FILE = "certseg-repository.json"


def templates_dir(version: str = REPOSITORY_VERSION) -> Path:
    """The templates of ``version``: package data of an installed certseg (``certseg.model_repository``), else
    the ``model_repository/`` folder of a source checkout."""
    try:
        root = Path(str(resources.files("certseg.model_repository")))
    except ModuleNotFoundError:
        root = Path(__file__).resolve().parents[1] / "model_repository"
    folder = root / "templates" / f"v{version}"
    if not folder.is_dir():
        raise RepositoryError(f"model-repository templates v{version} not found at {folder}")
    return folder


def _per_sample(dims: tuple[int | str, ...]) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) else -1 for d in dims[1:])


@dataclass(frozen=True)
class SegmenterIO:
    """A segmenter ONNX file's names and per-sample dims (batch dropped; -1 where the graph is dynamic), and
    how its input is made: the normalisation and fixed input size the pipeline must use."""

    images: tuple[int, ...]
    logits: tuple[int, ...]
    input_name: str = "images"
    output_name: str = "logits"
    normalization: Normalization = IMAGENET
    input_size: tuple[int, int] | None = None
    classes: list[str] | None = None
    """The class names and palette the file's metadata props state (used when the export's metadata has none)."""
    palette: list[list[int]] | None = None

    @property
    def num_classes(self) -> int:
        return self.logits[0]


def segmenter_io(path: Path, record: Mapping[str, Any] | None = None) -> SegmenterIO:
    """The segmenter contract of ``path`` (read without loading the weights; one line if it is broken), with
    ``record``'s normalisation / input size, where it states them, over the file's metadata props."""
    checked = segmenter_contract(path)
    record = record or {}
    if "normalization" in record:
        norm = facts.normalization(SimpleModel(extra={"normalization": record["normalization"]}))
    else:
        norm = checked.facts.get("normalization") or IMAGENET
    size = record["input_size"] if "input_size" in record else checked.input_size
    return SegmenterIO(_per_sample(checked.inputs[0].dims), _per_sample(checked.output.dims),
                       checked.inputs[0].name, checked.output.name, norm,
                       None if size is None else (int(size[0]), int(size[1])),
                       checked.facts.get("classes"), checked.facts.get("palette"))


@dataclass(frozen=True)
class DenoiserIO:
    """A denoiser ONNX file's names, its size S, output channels C and noise schedule."""

    size: int
    channels: int
    x_t: str = "x_t"
    timesteps: str = "timesteps"
    eps: str = "eps"
    schedule: Schedule = LINEAR


def denoiser_io(path: Path, record: Mapping[str, Any] | None = None) -> DenoiserIO:
    """The denoiser contract of ``path`` (one line if it is broken), with ``record``'s schedule over the file's."""
    checked = denoiser_contract(path)
    record = record or {}
    if "schedule" in record:
        schedule = facts.schedule(SimpleModel(extra={"schedule": record["schedule"]}))
    else:
        schedule = checked.facts.get("schedule") or LINEAR
    x_t, timesteps = checked.inputs
    return DenoiserIO(int(checked.input_size[0]), checked.channels, x_t.name, timesteps.name,  # type: ignore[index]
                      checked.output.name, schedule)


def denoiser_shape(path: Path) -> tuple[int, int]:
    """(S, C) of a denoiser ONNX file: x_t [B, 3, S, S] and eps [B, C, S, S]."""
    io = denoiser_io(path)
    return io.size, io.channels


@dataclass(frozen=True)
class SimpleModel:
    """Just the ``extra`` of a model, for reading facts out of a record."""

    extra: Mapping[str, Any]


def pbtxt_string(value: str) -> str:
    """A protobuf text-format string literal (quotes, backslashes and newlines escaped)."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def parameters_block(parameters: Mapping[str, Any]) -> str:
    """``parameters { key: … value: { string_value: … } }`` lines; non-strings are stored as JSON."""
    lines = []
    for key, value in parameters.items():
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        lines.append(f"parameters {{ key: {pbtxt_string(key)} value: {{ string_value: {pbtxt_string(text)} }} }}")
    return "\n".join(lines)


def parse_config(text: str, where: str = "config.pbtxt"):
    """Parse with Triton's own schema (``ModelConfig`` from tritonclient); a clear error names the file."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as error:
        raise RepositoryError(f"{where} does not parse as a Triton ModelConfig: {error}") from None


def _link_or_copy(source: Path, target: Path, link: bool) -> None:
    if link:
        try:
            os.link(source, target)
            return
        except OSError:
            pass
    shutil.copy2(source, target)


@dataclass(frozen=True)
class _Served:
    """A model step's file (ONNX or plan) plus the side files that travel with it."""

    path: Path
    side_files: tuple[Path, ...] = ()

    @property
    def platform(self) -> str:
        return "onnxruntime_onnx" if self.path.suffix == ".onnx" else "tensorrt_plan"

    @property
    def served_name(self) -> str:
        """The name in ``<model>/1/``: the ONNX file's own (its side files refer to it), or model.plan."""
        return self.path.name if self.path.suffix == ".onnx" else "model.plan"


@dataclass(frozen=True)
class _Plan:
    """One model folder to write: which template, with which variables, serving which file."""

    name: str
    template: str
    variables: dict[str, str]
    served: _Served | None = None


def write_repository(
    models: ModelFiles | ProvidesModelFiles | Mapping[str, Any],
    repository_dir: str | os.PathLike,
    *,
    profile: Profile | str = Profile.cpu,
    max_batch: int = 16,
    instances: int = 1,
    step_instances: int = 1,
    queue_delay_us: int = 0,
    gpu_engine: GpuEngine = "onnxruntime",
    fp16: bool = False,
    noise_backend: NoiseBackend | str = NoiseBackend.numpy_philox,
    threads: int = 0,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    link: bool = True,
    overwrite: bool = False,
) -> Path:
    """Render the templates for ``models`` into ``repository_dir`` and return it.

    ``max_batch``: the most samples one request may ask for (and the model steps' dynamic-batching limit).
    ``instances``: model instances of the denoiser and segmenter steps (per GPU on the gpu profile);
    ``step_instances``: instances of each light python step. ``queue_delay_us``: how long the dynamic batcher
    waits to join requests from concurrent ensemble runs. gpu profile: ``gpu_engine`` picks ONNX Runtime or
    the TensorRT plans, ``fp16`` the fp16 ONNX files (with plans, it records that they run in fp16).
    cpu profile: ``threads`` caps the torch and ONNX Runtime threads of every python step (0: their default,
    all cores; keep instances x threads near the core count). ``max_request_bytes``: the most bytes of noisy
    images (COUNT x C x H x W float32) one request may make; the noise step refuses larger requests before
    making them, and clients read the limit from the ensembles and split their requests to fit (the server holds
    several copies per request in flight: size it with the server's memory). ONNX files are hard-linked when
    possible (``link``). The repository is built in a temporary folder and moved into place only once every
    config parsed.
    """
    profile = choice(Profile, profile, "profile", RepositoryError)
    noise_backend = choice(NoiseBackend, noise_backend, "noise_backend", RepositoryError)
    if max_batch < 1 or instances < 1 or step_instances < 1 or queue_delay_us < 0 or threads < 0:
        raise RepositoryError("max_batch, instances and step_instances must be >= 1, queue_delay_us and threads >= 0")
    if max_request_bytes < 1:
        raise RepositoryError(f"max_request_bytes must be >= 1, got {max_request_bytes}")
    files = model_files(models)
    target = Path(repository_dir)
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise RepositoryError(f"{target} exists and is not empty (pass overwrite=True to replace it)")
    settings = {
        "max_batch": max_batch, "instances": instances, "step_instances": step_instances,
        "queue_delay_us": queue_delay_us, "noise_backend": noise_backend,
        "precision": "fp16" if profile == Profile.gpu and fp16 else "fp32",
        "engine": gpu_engine if profile == Profile.gpu else "onnxruntime in the python backend",
        "threads": threads, MAX_REQUEST_BYTES: max_request_bytes,
    }
    plans = _plans(files, profile, gpu_engine, fp16, settings)
    templates = templates_dir()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would hide the repository from a server running as another user
    try:
        for plan in plans:
            _write_model(staging, templates, profile, plan, link)
        summary = {"certseg_repository_version": REPOSITORY_VERSION, "profile": profile, **settings,
                   "models": sorted(plan.name for plan in plans)}
        (staging / METADATA_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target


def _serve(onnx: Path, half: Path | None, plan: Path | None, role: str, profile: Profile, gpu_engine: GpuEngine,
           fp16: bool) -> _Served:
    """The file a model step serves: fp32 ONNX on CPU; on the GPU the fp16 ONNX or the TensorRT plan if asked."""
    chosen = onnx
    if profile == Profile.gpu and gpu_engine == "tensorrt":
        if plan is None:
            raise RepositoryError(f"gpu_engine='tensorrt' needs a TensorRT plan of the {role} (export with tensorrt)")
        chosen = plan
    elif profile == Profile.gpu and fp16:
        if half is None:
            raise RepositoryError(f"fp16=True needs the fp16 ONNX file of the {role} (export with fp16)")
        chosen = half
    if not chosen.is_file():
        raise RepositoryError(f"model file {chosen} does not exist")
    side = tuple(external_data_files(chosen)) if chosen.suffix == ".onnx" else ()
    missing = [p for p in side if not p.is_file()]
    if missing:
        raise RepositoryError(f"{chosen} keeps its weights in {missing[0]}, which does not exist")
    return _Served(chosen, side)


def _plans(files: ModelFiles, profile: Profile, gpu_engine: GpuEngine, fp16: bool,
           settings: Mapping[str, Any]) -> list[_Plan]:
    """Every model folder of the repository: the python steps, one segment step per distinct segmenter, the
    denoise step, and the ensembles (each with its own metadata: its segmenter's record, classes, normalisation
    and input size, and the denoiser's schedule). The steps that make a segmenter's input get its
    normalisation (certseg_prepare: the SegCertify segmenter's; certseg_resize: the DenoiseCertify one's)."""
    gpu = profile == Profile.gpu
    records = {role: files.metadata.get(role) if isinstance(files.metadata.get(role), Mapping) else None
               for role in ("segmenter", "segcertify_segmenter", "denoiser")}
    io = segmenter_io(files.segmenter, records["segmenter"])
    num_classes = io.num_classes
    if num_classes > 65536:
        raise RepositoryError(f"{num_classes} classes do not fit uint16 label maps")
    denoiser_facts = denoiser_io(files.denoiser, records["denoiser"]) if files.denoiser is not None else None
    ios = {"segmenter": io}
    if files.segcertify_segmenter is not None and files.segcertify_segmenter != files.segmenter:
        ios["segcertify_segmenter"] = segmenter_io(files.segcertify_segmenter, records["segcertify_segmenter"])
        if ios["segcertify_segmenter"].num_classes != num_classes:
            raise RepositoryError("the SegCertify segmenter must have as many classes as the segmenter")
    segcertify_io = ios.get("segcertify_segmenter", io)
    schedule = LINEAR if denoiser_facts is None else denoiser_facts.schedule
    common = {
        "repository_version": REPOSITORY_VERSION,
        "profile": profile,
        **{key: str(value) for key, value in settings.items()},
        "step_kind": "KIND_GPU" if gpu else "KIND_CPU",
        "num_classes": str(num_classes),
        "labels_type": "TYPE_UINT8" if label_numpy_dtype(num_classes).itemsize == 1 else "TYPE_UINT16",
        "denoiser_size": str(0 if denoiser_facts is None else denoiser_facts.size),
        "eps_channels": str(0 if denoiser_facts is None else denoiser_facts.channels),
        "denoiser_x_t": pbtxt_string("x_t" if denoiser_facts is None else denoiser_facts.x_t),
        "denoiser_timesteps": pbtxt_string("timesteps" if denoiser_facts is None else denoiser_facts.timesteps),
        "denoiser_eps": pbtxt_string("eps" if denoiser_facts is None else denoiser_facts.eps),
        "schedule": pbtxt_string(json.dumps(schedule.record(), sort_keys=True)),
        "prepare_normalization": pbtxt_string(segcertify_io.normalization.to_json()),
        "resize_normalization": pbtxt_string(io.normalization.to_json()),
        "python_parameters": parameters_block(
            {"FORCE_CPU_ONLY_INPUT_TENSORS": "no"} if gpu
            else {"torch_threads": str(settings["threads"]), "ort_threads": str(settings["threads"])}
        ),
    }

    def serve(onnx: Path, half: Path | None, plan: Path | None, role: str) -> _Served:
        return _serve(onnx, half, plan, role, profile, gpu_engine, fp16)

    segments = {"certseg_segment": ("segmenter", serve(files.segmenter, files.segmenter_fp16, files.segmenter_plan,
                                                        "segmenter"))}
    segcertify_segment = "certseg_segment"
    second = files.segcertify_segmenter
    if second is not None and "segcertify_segmenter" in ios:
        segcertify_segment = "certseg_segment_segcertify"
        segments[segcertify_segment] = ("segcertify_segmenter", serve(
            second, files.segcertify_segmenter_fp16, files.segcertify_segmenter_plan, "SegCertify segmenter"))
    plans = []
    for name, (role, served) in segments.items():
        dims = ios[role]
        plans.append(_Plan(name, "certseg_segment", {
            **common, "model_name": name, "segmenter_file": served.served_name, "segmenter_platform": served.platform,
            "images_dims": _dims(dims.images), "logits_dims": _dims(dims.logits),
            "segmenter_input": pbtxt_string(dims.input_name), "segmenter_output": pbtxt_string(dims.output_name)},
            served))
    ensembles = {"certseg_segcertify": (segcertify_segment, None)}
    if files.denoiser is not None:
        denoiser = serve(files.denoiser, files.denoiser_fp16, files.denoiser_plan, "denoiser")
        plans.append(_Plan("certseg_denoise", "certseg_denoise", {
            **common, "denoiser_file": denoiser.served_name, "denoiser_platform": denoiser.platform}, denoiser))
        ensembles["certseg_denoisecertify"] = ("certseg_segment", denoiser)
    light = {step for name in ensembles for step in STEPS[name]} - {"certseg_segment", "certseg_denoise"}
    plans += [_Plan(name, name, common) for name in sorted(light)]
    for name, (segment, denoiser) in ensembles.items():
        role, served = segments[segment]
        segment_io = ios[role]
        served_files = {segment: served}
        if denoiser is not None:
            served_files["certseg_denoise"] = denoiser
        digests = {step: file_sha256(s.path) for step, s in served_files.items()}
        stated = {key: getattr(segment_io, key) for key in ("classes", "palette") if getattr(segment_io, key)}
        metadata: dict[str, Any] = {
            "certseg_profile": profile,
            "num_classes": num_classes,
            **{key: settings[key] for key in ("max_batch", "noise_backend", "precision", "engine", MAX_REQUEST_BYTES)},
            "served_files": {step: {"file": s.path.name, "sha256": digests[step]} for step, s in served_files.items()},
            "models_sha256": hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest(),
            **(stated if "classes" not in files.metadata else {}),
            **{key: files.metadata[key] for key in ("classes", "palette") if key in files.metadata},
            "normalization": facts.normalization_record(segment_io.normalization),
            "segmenter_input_size": None if segment_io.input_size is None else list(segment_io.input_size),
        }
        if records[role] is not None:  # the record of the segmenter this ensemble serves (never the other's)
            metadata["segmenter"] = records[role]
        if denoiser is not None and denoiser_facts is not None:
            metadata["denoiser_size"] = denoiser_facts.size
            metadata["schedule"] = denoiser_facts.schedule.record()
            if records["denoiser"] is not None:
                metadata["denoiser"] = records["denoiser"]
        plans.append(_Plan(name, name, {**common, "segment_model": segment,
                                        "request_inputs": request_inputs_block(denoising=denoiser is not None),
                                        "segment_input": pbtxt_string(segment_io.input_name),
                                        "segment_output": pbtxt_string(segment_io.output_name),
                                        "metadata_parameters": parameters_block(metadata)}))
    return plans


def request_inputs_block(*, denoising: bool) -> str:
    """An ensemble's ``input [...]`` entries, rendered from the client's request schema (``REQUEST_INPUTS``)."""
    return ",\n".join(f'  {{ name: "{i.name}" data_type: TYPE_{i.triton_type} dims: [ {_dims(i.dims)} ] }}'
                       for i in REQUEST_INPUTS if denoising or not i.denoising_only)


def _dims(dims: tuple[int, ...]) -> str:
    return ", ".join(str(d) for d in dims)


def _template(templates: Path, profile: Profile, name: str) -> Path:
    for folder in (profile, "common"):
        path = templates / folder / name / "config.pbtxt.in"
        if path.is_file():
            return path
    raise RepositoryError(f"no config template for {name} ({profile} profile) in {templates}")


def _write_model(root: Path, templates: Path, profile: Profile, plan: _Plan, link: bool) -> None:
    template = _template(templates, profile, plan.template)
    try:
        text = string.Template(template.read_text()).substitute(plan.variables)
    except (KeyError, ValueError) as error:
        raise RepositoryError(f"{template}: bad or unknown placeholder {error}") from None
    config = parse_config(text, f"{plan.name}/config.pbtxt (from {template})")
    if config.name != plan.name:
        raise RepositoryError(f"{template} names its model {config.name!r}, expected {plan.name!r}")
    if config.parameters[VERSION_PARAMETER].string_value != REPOSITORY_VERSION:
        raise RepositoryError(f"{template} does not carry {VERSION_PARAMETER} = {REPOSITORY_VERSION}")
    version_dir = root / plan.name / "1"
    version_dir.mkdir(parents=True)
    (root / plan.name / "config.pbtxt").write_text(text)
    if config.backend == "python":
        code = templates / "python" / plan.template / "model.py"
        if not code.is_file():
            raise RepositoryError(f"python step {plan.template} has no model.py in {templates / 'python'}")
        shutil.copy2(code, version_dir / "model.py")
        shutil.copy2(templates / "python" / STEP_HELPER, version_dir / STEP_HELPER)
    if plan.served is not None:
        _link_or_copy(plan.served.path, version_dir / plan.served.served_name, link)
        for side in plan.served.side_files:
            _link_or_copy(side, version_dir / side.name, link)


def read_configs(repository_dir: str | os.PathLike) -> dict[str, Any]:
    """Every ``<model>/config.pbtxt`` of a repository, parsed with Triton's schema (model name -> ModelConfig)."""
    root = Path(repository_dir)
    return {p.parent.name: parse_config(p.read_text(), str(p)) for p in sorted(root.glob("*/config.pbtxt"))}
