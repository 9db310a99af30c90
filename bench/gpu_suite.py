"""One command that a lent GPU runs once (< 8 minutes on an H100/H200): what certification costs there.

    python -m certseg.bench.gpu_suite --out DIR             # where certseg is installed
    python bench/gpu_suite.py --out DIR                     # from a plain copy of the repository, no pip
    python -m certseg.bench.gpu_suite --out DIR --dry-run   # CPU, tiny models, < 1 minute (the test suite runs it)

Writes ``DIR/gpu.json`` and ``DIR/gpu.md``, rewritten after every configuration: seconds per 1024×2048 image and
samples/s of DenoiseCertify and SegCertify (ADM-256 + HRNetV2-W48 with random weights, n0 = 10, n = 100) at
fp16 / bf16 / fp32, eager and ``torch.compile``d, the split into stages, peak GPU memory, FLOPs per sample and the
fraction of the FLOP limit reached, and the served path where a tritonserver is there. Noise is drawn on the GPU,
labels are counted there and only the final counts come back; the models run channels-last under autocast, as
``certseg certify --device cuda --noise-backend torch`` runs them. Each configuration is time-boxed (420 s in
all by default); what does not fit, or is not installed, is one line under ``skipped``.

On the device machine (a copy of the working tree, not installed; Python 3.12, a CUDA torch, no network), in the
repository root, where the device tool starts:

    mkdir -p "$OUT/gpu" && PYTHONUNBUFFERED=1 timeout 480 python3 bench/gpu_suite.py --out "$OUT/gpu" 2>&1 \
        | tee "$OUT/gpu/log.txt" | tail -n 60

(420 s of sections plus start-up; ``timeout`` only guards a compile that overruns, and the files written so far
stay.) It needs numpy, scipy and torch only (no typer, rich, safetensors, Pillow or tritonclient).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("engine", "export", "bench", "training", "model_repository", "examples")
"""``certseg.<folder>`` is the repository's ``<folder>/``, as pyproject's package-dir maps them."""


def map_checkout(root: Path = ROOT) -> None:
    """Import ``certseg`` from this checkout without installing it (what the editable install's finder does)."""
    import importlib.machinery
    import importlib.util

    class CheckoutFinder:
        @classmethod
        def find_spec(cls, name: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec:
            if name == "certseg":
                spec = importlib.machinery.ModuleSpec("certseg", None, is_package=True)
                spec.submodule_search_locations = []
                return spec
            parent, _, child = name.partition(".")
            if parent == "certseg" and child in FOLDERS:
                folder = root / child
                return importlib.util.spec_from_file_location(
                    name, folder / "__init__.py", submodule_search_locations=[str(folder)])
            return None

    sys.meta_path.insert(0, CheckoutFinder)
    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(here)]  # bench/'s modules shadow none


def main(argv: list[str] | None = None) -> int:
    from certseg.bench.gpu.suite import main as run

    return run(argv)


if __name__ == "__main__":
    if not __package__:  # run as a file: measure this checkout, whatever else is installed
        map_checkout()
    sys.exit(main())
