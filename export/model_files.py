"""``ModelFiles``: the exported model files a Triton repository serves, and the facts clients must learn.

Made by ``ExportResult.model_files()`` (``certseg-export``), or by hand for files exported elsewhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

from certseg.engine.errors import CertsegError


class RepositoryError(CertsegError, ValueError):
    """A template, model file or rendered config that cannot make a valid repository."""


@dataclass(frozen=True)
class ModelFiles:
    """The exported models a repository serves, and what the client must learn about them."""

    segmenter: Path
    """Segmenter ONNX: images float32 [B,3,h,w] (normalised as it states) -> class scores float32 [B,K,h',w']."""
    denoiser: Path | None = None
    """Denoiser ONNX: x_t float32 [B,3,S,S], timesteps int64 [B] -> eps float32 [B,C,S,S] (any names)."""
    segcertify_segmenter: Path | None = None
    """A second segmenter for the SegCertify ensemble (typically noise-trained); default: ``segmenter``."""
    segmenter_fp16: Path | None = None
    denoiser_fp16: Path | None = None
    segcertify_segmenter_fp16: Path | None = None
    segmenter_plan: Path | None = None
    denoiser_plan: Path | None = None
    segcertify_segmenter_plan: Path | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    """JSON-ready facts for clients: ``classes``, ``palette``, and the ``segmenter``, ``denoiser`` and
    ``segcertify_segmenter`` records (name, family, source, sha256 of the checkpoint) that results store. A
    record's ``normalization`` / ``input_size`` (segmenters) and ``schedule`` (denoiser) take precedence over
    what the file's metadata props state (``certseg-export`` puts command-line overrides there)."""


class ProvidesModelFiles(Protocol):
    """What can say which files it exported (``certseg.export.result.ExportResult``)."""

    def model_files(self) -> ModelFiles: ...


PATH_FIELDS = tuple(f.name for f in fields(ModelFiles) if f.name != "metadata")


def model_files(source: ModelFiles | ProvidesModelFiles | Mapping[str, Any]) -> ModelFiles:
    """``ModelFiles`` from itself, from an export (its ``model_files()``), or from a mapping of the field names."""
    if isinstance(source, ModelFiles):
        return source
    if not isinstance(source, Mapping):
        return source.model_files()
    paths = {name: None if source.get(name) is None else Path(source[name]) for name in PATH_FIELDS}
    if paths["segmenter"] is None:
        raise RepositoryError("a repository needs at least the segmenter's ONNX file")
    return ModelFiles(**paths, metadata=dict(source.get("metadata") or {}))
