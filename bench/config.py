"""What a bench run is: the options, the grid of settings they span, and the seed of every entry.

Seeds: every entry of image ``index`` (its position in the dataset's protocol order) uses the root seed
``image_seed(S, index)`` = the first 64-bit word of ``numpy.random.SeedSequence([S, index])``, shifted right by one
(63 bits, like ``certseg``'s own seeds). ``S`` is ``--seed`` (default 0). The seed does not depend on the method,
σ or scale: all settings of one image see the same standard-normal draws (common random numbers, so differences
between settings are not noise), and ``certseg certify --seed <entry seed>`` on the same image and settings
reproduces an entry exactly.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from certseg.engine.choices import Method
from certseg.engine.errors import InputError
from certseg.engine.limits import DEFAULT_MAX_PIXELS
from certseg.engine.session import Settings

VARIANTS: tuple[str, ...] = ("engine", "baseline")
RESULTS_FILE = "results.jsonl"


def image_seed(root_seed: int, index: int) -> int:
    """The root seed of every entry of protocol image ``index`` (see the module docstring)."""
    if root_seed < 0 or index < 0:
        raise InputError(f"--seed and image indices must be >= 0, got {root_seed}, {index}")
    return int(np.random.SeedSequence([int(root_seed), int(index)]).generate_state(1, np.uint64)[0] >> np.uint64(1))


@dataclass(frozen=True, order=True)
class Setting:
    """One column group of the paper's tables: a method at one scale and one σ."""

    method: str
    scale: float
    sigma: float

    def label(self) -> str:
        return f"{self.method} σ={self.sigma:g} scale={self.scale:g}"


@dataclass(frozen=True)
class BenchConfig:
    images: int = 100
    dataset: str | None = None
    root: Path | None = None
    data_seed: int = 0
    scene_size: tuple[int, int] | None = None
    write_data: Path | None = None
    resize: int | None = None
    methods: tuple[str, ...] = ("segcertify", "denoisecertify")
    sigmas: tuple[float, ...] = (0.25, 0.5, 1.0)
    scales: tuple[float, ...] = (1.0,)
    n0: int = 10
    n: int = 100
    alpha: float = 0.001
    tau: float = 0.75
    fwer: str = "holm"
    segmenter: str | None = None
    denoiser: str | None = None
    runtime: str = "torch"
    device: str | None = None
    precision: str = "fp32"
    batch: int = 16
    t_rule: str = "principled"
    antialias: bool = False
    noise_backend: str = "numpy-philox"
    seed: int = 0
    out: Path = Path("bench-out")
    baseline: bool = False
    save_labels: bool = False
    radius_map: bool = False
    """Also record each entry's per-pixel radii (as counts per agreement level) for accuracy-vs-radius curves."""
    stage_timing: bool = True
    threads: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Images and label maps with more pixels are refused from their header, before decoding."""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for method in self.methods:
            if method not in list(Method):
                raise InputError(f"unknown method {method!r}; choose from {', '.join(Method)}")
        for name, values in (("--method", self.methods), ("--sigma", self.sigmas), ("--scale", self.scales)):
            if not values:
                raise InputError(f"{name} needs at least one value")
        if any(s <= 0 for s in self.sigmas) or any(s <= 0 for s in self.scales):
            raise InputError("--sigma and --scale values must be > 0")
        if self.seed < 0:
            raise InputError(f"--seed must be >= 0, got {self.seed}")

    @property
    def results_path(self) -> Path:
        return Path(self.out) / RESULTS_FILE

    @property
    def variants(self) -> tuple[str, ...]:
        return VARIANTS if self.baseline else VARIANTS[:1]

    def grid(self) -> list[Setting]:
        """Every (method, scale, σ) combination, in the paper's row order (scale, then method, then σ)."""
        unique = dict.fromkeys(
            Setting(m, float(sc), float(sg)) for sc, m, sg in itertools.product(self.scales, self.methods, self.sigmas)
        )
        return list(unique)

    def session_settings(self, setting: Setting) -> Settings:
        """The engine settings of one grid cell: exactly what ``certseg certify`` would build from the same flags."""
        return Settings(
            method=setting.method, sigma=setting.sigma, n0=self.n0, n=self.n, alpha=self.alpha, tau=self.tau,
            fwer=self.fwer, scale=setting.scale, t_rule=self.t_rule, antialias=self.antialias,
            segmenter=self.segmenter, denoiser=self.denoiser, runtime=self.runtime, device=self.device,
            precision=self.precision, batch=self.batch, noise_backend=self.noise_backend,
        )

    def compat(self, dataset: dict[str, Any], device: str) -> dict[str, Any]:
        """Everything that changes an entry's numbers: a run may only resume a results file that agrees on it.

        The selection lists (images, methods, σ, scales, baseline) are not here: they only add or skip entries.
        """
        keep = ("seed", "n0", "n", "alpha", "tau", "fwer", "segmenter", "denoiser", "runtime", "precision", "batch",
                "t_rule", "antialias", "noise_backend", "radius_map")
        own = {k: v for k, v in asdict(self).items() if k in keep}
        same_pixels = {k: dataset.get(k) for k in ("name", "root", "generator_version", "scene_size", "resize")}
        return {**own, "device": device, "dataset": same_pixels}
