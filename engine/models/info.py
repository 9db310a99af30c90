"""Who a model is: the one record that results, exports and clients of a server describe a model by.

A model's identity (name, family, role, source, the sha256 of its file) and what it states beyond its weights
(K, the input size it must be fed, class names and palette, a segmenter's normalisation, a denoiser's noise
schedule) read the same whether its weights are in this process (``LoadedModel``: this record plus the module),
in an ONNX file run as given, or on a Triton server (``certseg.engine.runtimes.triton_runtime.served_model``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal

from certseg.engine.maths.normalization import Normalization
from certseg.engine.maths.schedules import Schedule

if TYPE_CHECKING:
    from torch import nn

Role = Literal["segmenter", "denoiser"]
ONNX_FAMILY = "onnx"
"""The family of a bring-your-own ONNX file: it runs as given, and its record says what it states."""
DESCRIBED = ("classes", "palette", "normalization", "schedule")
"""What a model may state beyond its weights, by the keys its records and exports use."""


@dataclass(frozen=True)
class ModelInfo:
    """A model's identity and what it states, without its weights.

    ``num_classes`` and ``input_size`` left out are read from ``config`` (torch families keep them in their
    builder config); records read back from JSON (lists, dicts) become the typed values.
    """

    name: str
    family: str
    role: Role
    source: str
    sha256: str
    config: Mapping[str, Any] = field(default_factory=dict)
    """The builder config of a torch family (the official configuration vocabulary); empty for ONNX files and
    served models."""
    num_classes: int | None = None
    """A segmenter's K."""
    input_size: tuple[int, int] | None = None
    """The denoiser's square input size, or the fixed (H, W) a segmenter must be fed (an ONNX graph's fixed dims,
    ``--seg-input-size``); None for a segmenter that takes any size."""
    classes: tuple[str, ...] | None = None
    palette: tuple[tuple[int, int, int], ...] | None = None
    normalization: Normalization | None = None
    """The input normalisation a segmenter states; None: ImageNet on [0, 1] pixels (``facts.normalization``)."""
    schedule: Schedule | None = None
    """The noise schedule a denoiser states; None: guided-diffusion's linear one (``facts.schedule``)."""
    details: Mapping[str, Any] = field(default_factory=dict)
    """What else its file says about it: an official checkpoint's preset, a shipped model's provenance, the file
    a server runs."""
    served: bool = False
    """Described by a Triton server, which runs it: its record is its identity, the rest is the server's."""

    def __post_init__(self) -> None:
        def set_(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        if self.num_classes is None and self.config.get("num_classes") is not None:
            set_("num_classes", int(self.config["num_classes"]))
        size = self.input_size
        if size is None:
            native = (self.config.get("create_model_kwargs") or {}).get("image_size")  # ADM: square, native size
            size = (native, native) if native is not None else self.config.get("input_size")
        set_("input_size", None if size is None else (int(size[0]), int(size[1])))
        if self.classes is not None:
            set_("classes", tuple(str(name) for name in self.classes))
        if self.palette is not None:
            set_("palette", tuple((int(c[0]), int(c[1]), int(c[2])) for c in self.palette))
        if isinstance(self.normalization, Mapping):
            value = self.normalization
            set_("normalization", Normalization(tuple(value["mean"]), tuple(value["std"]),
                                                tuple(value["input_range"])))
        if isinstance(self.schedule, Mapping):
            set_("schedule", Schedule(str(self.schedule["name"]), int(self.schedule["num_timesteps"])))

    @property
    def stated(self) -> dict[str, Any]:
        """What it states beyond its weights, JSON-ready, by the keys of ``DESCRIBED`` (only those it states)."""
        norm = self.normalization
        values = {
            "classes": None if self.classes is None else list(self.classes),
            "palette": None if self.palette is None else [list(colour) for colour in self.palette],
            "normalization": None if norm is None else {
                "mean": list(norm.mean), "std": list(norm.std), "input_range": list(norm.input_range)},
            "schedule": None if self.schedule is None else self.schedule.record(),
        }
        return {key: value for key, value in values.items() if value is not None}

    @property
    def extra(self) -> dict[str, Any]:
        """``details`` and ``stated`` in one JSON-ready mapping: the shape exports and their readers use."""
        return {**self.details, **self.stated}

    @property
    def info(self) -> ModelInfo:
        """This record alone (a ``LoadedModel`` without its module)."""
        return ModelInfo(**{f.name: getattr(self, f.name) for f in fields(ModelInfo)})

    def record(self) -> dict[str, Any]:
        """What results record: name, family, source and sha256; an ONNX file run here also records what it is
        beyond its bytes (role, K, input size and what it states: classes, palette, normalisation, schedule)."""
        out: dict[str, Any] = {"name": self.name, "family": self.family, "source": self.source, "sha256": self.sha256}
        if self.family == ONNX_FAMILY and not self.served:
            described = {"role": self.role, "num_classes": self.num_classes, "input_size": self.input_size,
                         **self.stated}
            out |= {key: value for key, value in described.items() if value is not None}
        return out


@dataclass(frozen=True)
class LoadedModel(ModelInfo):
    """A model ready for inference in this process: its ``ModelInfo`` plus the module that runs it."""

    module: nn.Module = field(kw_only=True, compare=False, repr=False)
