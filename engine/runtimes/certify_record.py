"""How a certificate was made: the typed record ``Session.certify`` returns beside the certified map.

``to_json()`` is what ``certseg certify``'s JSON and ``certseg-bench``'s entries hold; its keys are a contract that
other tools read. The record also reads like that JSON by key (``record["pipeline"]["timestep"]``), for callers
written when ``certify`` returned the dict itself.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from certseg.engine.maths.pipeline_spec import PipelineSpec
from certseg.engine.models.info import ModelInfo
from certseg.engine.runtimes.memory import MemoryEstimate
from certseg.engine.runtimes.settings import Settings

KEYS = ("settings", "pipeline", "models", "device", "timings", "non_finite", "certified_space", "memory")
"""The keys of ``CertifyRecord.to_json()``, in order."""


@dataclass(frozen=True)
class Timings:
    """Where one certification's time went, in seconds (``server_stages``: per step, on Triton servers)."""

    selection: float
    estimation: float
    certify: float
    total: float
    samples_per_second: float
    server_stages: Mapping[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"selection": self.selection, "estimation": self.estimation, "certify": self.certify,
                               "total": self.total, "samples_per_second": self.samples_per_second}
        if self.server_stages is not None:
            out["server_stages"] = dict(self.server_stages)
        return out


@dataclass(frozen=True)
class CertifyRecord(Mapping[str, Any]):
    """The settings, the pipeline spec, the models, where they ran, how long it took, the non-finite outputs met,
    the space R holds in and the memory estimate of one certification."""

    settings: Settings
    pipeline: PipelineSpec
    segmenter: ModelInfo
    denoiser: ModelInfo | None
    device: str
    timings: Timings
    non_finite: Mapping[str, Any]
    """The policy, and how many selection / estimation samples and (sample, pixel) pairs were non-finite."""
    certified_space: Mapping[str, Any]
    memory: MemoryEstimate | None
    """None where the memory is not this process's (Triton servers)."""
    quantization: Mapping[str, Any] | None = None
    """int8 runs only: the int8 graphs' record (recipe, calibration set, versions), under the key ``quantization``
    (absent otherwise, so other certificates' JSON is as before)."""

    @property
    def keys_present(self) -> tuple[str, ...]:
        return KEYS if self.quantization is None else (*KEYS, "quantization")

    def to_json(self) -> dict[str, Any]:
        """JSON-ready, under ``KEYS`` (and ``quantization`` for int8): the part of every certificate's JSON that
        says how it was made."""
        extra = {} if self.quantization is None else {"quantization": dict(self.quantization)}
        return {
            "settings": self.settings.record(),
            "pipeline": self.pipeline.record(),
            "models": {"segmenter": self.segmenter.record(),
                       "denoiser": None if self.denoiser is None else self.denoiser.record()},
            "device": self.device,
            "timings": self.timings.to_json(),
            "non_finite": dict(self.non_finite),
            "certified_space": dict(self.certified_space),
            "memory": None if self.memory is None else self.memory.record(),
        } | extra

    def __getitem__(self, key: str) -> Any:
        if key not in self.keys_present:
            raise KeyError(key)
        return self.to_json()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys_present)

    def __len__(self) -> int:
        return len(self.keys_present)
