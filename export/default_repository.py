"""The Triton repository ``certseg serve`` serves when given none: the shipped default models, exported once
and cached under ``certseg.engine.cache.cache_dir()``."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from certseg.engine.cache import cached_folder
from certseg.engine.digest import file_sha256, tree_sha256
from certseg.engine.errors import CheckpointError
from certseg.engine.models.registry import default_model, load_model, resolve
from certseg.engine.runtimes.triton_runtime import DEFAULT_MAX_REQUEST_BYTES, REPOSITORY_VERSION
from certseg.export.models import EXPORT_FORMAT_VERSION, default_image_size, export_models
from certseg.export.repository import METADATA_FILE, templates_dir, write_repository


def default_repository(
    *, max_batch: int = 16, max_request_bytes: int | None = None, threads: int = 0, refresh: bool = False
) -> Path:
    """A CPU repository of the shipped default models, exported once and cached under ``cache_dir()``.

    Keyed by everything that decides its content: the model files' sha256s, the repository and export format
    versions, a hash of the templates folder (a changed template never serves from a stale cache) and the
    rendering parameters (``max_batch``, ``max_request_bytes``, default: ``DEFAULT_MAX_REQUEST_BYTES``; ``threads``
    of each python step, 0: all cores, in the key only when set, so earlier caches stay valid). Serves
    DenoiseCertify (default segmenter + denoiser) and SegCertify (its own default segmenter when one is shipped,
    else the same segmenter).
    """
    names = {"segmenter": default_model("segmenter", "denoisecertify"),
             "denoiser": default_model("denoiser", "denoisecertify")}
    try:
        names["segcertify_segmenter"] = default_model("segmenter", "segcertify")
    except CheckpointError:
        names["segcertify_segmenter"] = names["segmenter"]
    digests = {role: file_sha256(resolve(name)[0]) for role, name in names.items()}
    rendering = {"max_batch": max_batch, "max_request_bytes": max_request_bytes or DEFAULT_MAX_REQUEST_BYTES,
                 **({"threads": threads} if threads else {})}
    parts = [REPOSITORY_VERSION, EXPORT_FORMAT_VERSION, tree_sha256(templates_dir()), rendering, digests]

    def build(root: Path) -> None:
        image_size = default_image_size(names["segmenter"])
        files = export_models(load_model(names["segmenter"], "segmenter"), load_model(names["denoiser"], "denoiser"),
                              root / "onnx", image_size=image_size, max_batch=max_batch, fp16=False,
                              tensorrt=False).model_files()
        if names["segcertify_segmenter"] != names["segmenter"]:
            segcertify = export_models(load_model(names["segcertify_segmenter"], "segmenter"), None,
                                       root / "onnx-segcertify", image_size=image_size, max_batch=max_batch,
                                       fp16=False, tensorrt=False).model_files()
            files = replace(files, segcertify_segmenter=segcertify.segmenter,
                            metadata={**files.metadata, "segcertify_segmenter": segcertify.metadata["segmenter"]})
        write_repository(files, root / "cpu", profile="cpu", **rendering)

    return cached_folder("repositories", parts, build, complete=f"cpu/{METADATA_FILE}", refresh=refresh) / "cpu"
