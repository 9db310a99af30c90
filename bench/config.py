"""What a bench run is: the options, the grid of settings they span, and the seed of every entry.

Seeds: every entry of image ``index`` (its position in the dataset's protocol order) uses the root seed
``image_seed(S, index)`` (``certseg.engine.seeds``: the first 64-bit word of ``numpy.random.SeedSequence([S,
index])``, shifted right by one; ``certseg certify`` seeds several images by the same rule). ``S`` is ``--seed``
(default 0). The seed does not depend on the method, σ or scale: all settings of one image see the same
standard-normal draws (common random numbers, so differences between settings are not noise), and
``certseg certify --seed <entry seed>`` on the same image and settings reproduces an entry exactly.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from certseg.engine.choices import Dataset, Method, Protocol, RuntimeName, SharedMemory, choice
from certseg.engine.errors import InputError
from certseg.engine.limits import DEFAULT_MAX_PIXELS
from certseg.engine.runtimes.process import huge_pages_enabled
from certseg.engine.runtimes.settings import BEFORE_ADDED, Settings
from certseg.engine.seeds import image_seed  # noqa: F401  (re-exported: the bench's name for the rule)

VARIANTS: tuple[str, ...] = ("engine", "baseline")
RESULTS_FILE = "results.jsonl"
COMPAT = {"compat": True}
"""Metadata of the ``BenchConfig`` fields besides the engine settings that change an entry's numbers."""
NOT_COMPAT: tuple[str, ...] = ("batch",)
"""Engine settings that change no entry's numbers (noise is drawn per sample index, whatever the batch), so a run
may resume a results file made with another value (or ``auto``)."""


@dataclass(frozen=True, order=True)
class Setting:
    """One column group of the paper's tables: a method at one scale and one σ, denoised in K steps (the grid's
    axes)."""

    method: str
    scale: float
    sigma: float
    denoise_steps: int = 1

    def label(self) -> str:
        steps = "" if self.denoise_steps == 1 else f" K={self.denoise_steps}"
        return f"{self.method} σ={self.sigma:g} scale={self.scale:g}{steps}"


GRID_AXES: tuple[str, ...] = tuple(f.name for f in fields(Setting))
"""The ``Settings`` fields a bench run spans (several values each); every other field is one value per run."""


@dataclass(frozen=True)
class BenchConfig:
    """A bench run: the grid of (method, σ, scale), the ``engine`` settings every cell shares, the dataset."""

    engine: Settings = field(default_factory=Settings)
    """Every engine setting; a grid cell replaces its method, σ and scale (``session_settings``)."""
    methods: tuple[Method, ...] = (Method.segcertify, Method.denoisecertify)
    sigmas: tuple[float, ...] = (0.25, 0.5, 1.0)
    scales: tuple[float, ...] = (1.0,)
    denoise_steps: tuple[int, ...] = (1,)
    """K values of denoisecertify's cells; segcertify denoises nothing, so its cells run once (K = 1)."""
    images: int = 100
    dataset: Dataset | None = None
    root: Path | None = None
    data_seed: int = 0
    scene_size: tuple[int, int] | None = None
    write_data: Path | None = None
    resize: int | None = None
    protocol: Protocol = field(default=Protocol.certseg, metadata=COMPAT)
    """How images reach the certifier (``certseg.bench.protocols``): certseg's own, or the peers'."""
    seed: int = field(default=0, metadata=COMPAT)
    out: Path = Path("bench-out")
    baseline: bool = False
    save_labels: bool = False
    radius_map: bool = field(default=False, metadata=COMPAT)
    """Also record each entry's per-pixel radii (as counts per agreement level) for accuracy-vs-radius curves."""
    stage_timing: bool = True
    threads: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Images and label maps with more pixels are refused from their header, before decoding."""
    servers: tuple[str, ...] = ()
    """``--runtime triton``: the gRPC HOST:PORTs to certify on; none: the bundled tritonserver, started for the
    run. Not compared on resume: the servers' ``SAMPLE_FIELDS`` are (entry by entry), whatever their addresses."""
    in_flight: int = 2
    """Requests in flight per server, per image (as ``certseg certify --in-flight``)."""
    shared_memory: SharedMemory = SharedMemory.auto
    retries: int = 3
    images_in_flight: int = 2
    """``--runtime triton``: images certified at once (a bounded pool sharing the servers); the certificates do not
    depend on it (every entry's seed is ``image_seed``; the servers draw each sample's noise from it)."""

    def __post_init__(self) -> None:
        """Choices as their enums, the runtime decided (as ``Session.open`` would, or triton with ``--server``),
        and the grid and the server options checked."""
        engine = self.engine
        if self.servers and engine.runtime is None:
            engine = replace(engine, runtime=RuntimeName.triton)
        object.__setattr__(self, "engine", engine.resolved())
        object.__setattr__(self, "servers", tuple(self.servers))
        object.__setattr__(self, "shared_memory", choice(SharedMemory, self.shared_memory, "--shared-memory",
                                                         InputError))
        if self.servers and self.engine.runtime != RuntimeName.triton:
            raise InputError(f"--server runs the models on Triton servers; it does not go with --runtime "
                             f"{self.engine.runtime}")
        if self.images_in_flight < 1 or self.in_flight < 1 or self.retries < 0:
            raise InputError(f"--images-in-flight and --in-flight must be >= 1 and --retries >= 0, got "
                             f"{self.images_in_flight}, {self.in_flight}, {self.retries}")
        object.__setattr__(self, "methods", tuple(choice(Method, m, "--method", InputError) for m in self.methods))
        object.__setattr__(self, "protocol", choice(Protocol, self.protocol, "--protocol", InputError))
        if self.dataset is not None:
            object.__setattr__(self, "dataset", choice(Dataset, self.dataset, "--dataset", InputError))
        for name, values in (("--method", self.methods), ("--sigma", self.sigmas), ("--scale", self.scales),
                             ("--denoise-steps", self.denoise_steps)):
            if not values:
                raise InputError(f"{name} needs at least one value")
        if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.denoise_steps):
            raise InputError(f"--denoise-steps values must be integers >= 1, got {list(self.denoise_steps)}")
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
        """Every (method, scale, σ, K) combination, in the paper's row order (scale, then method, then σ, then K);
        segcertify's cells take K = 1 only."""
        unique = dict.fromkeys(
            Setting(m.value, float(sc), float(sg), int(k) if m == Method.denoisecertify else 1)
            for sc, m, sg, k in itertools.product(self.scales, self.methods, self.sigmas, self.denoise_steps)
        )
        return list(unique)

    def session_settings(self, setting: Setting) -> Settings:
        """The engine settings of one grid cell: exactly what ``certseg certify`` would build from the same flags."""
        return replace(self.engine, **{axis: getattr(setting, axis) for axis in GRID_AXES})

    def record(self) -> dict[str, Any]:
        """The results file's ``session`` line: the run's own fields beside the shared engine settings, flat (the
        keys it had when they were all fields of this class)."""
        own = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "engine"}
        return {**own, **shared_settings(self.engine), "thp_mem_alloc": huge_pages_enabled()}

    def compat(self, dataset: dict[str, Any], device: str) -> dict[str, Any]:
        """Everything that changes an entry's numbers: a run may only resume a results file that agrees on it.

        Every engine setting but the grid's axes (the selection lists: images, methods, σ, scales, K and baseline
        only add or skip entries) and ``NOT_COMPAT``, the ``COMPAT`` fields, the device as resolved, and the
        dataset's pixels.
        """
        own = {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("compat")}
        same_pixels = {k: dataset.get(k) for k in ("name", "root", "generator_version", "scene_size", "resize")}
        engine = {k: v for k, v in shared_settings(self.engine).items() if k not in NOT_COMPAT}
        return {**engine, **own, "device": device, "dataset": same_pixels}


def compat_defaults() -> dict[str, Any]:
    """What each compat key stands for in a results header written before the key existed: its default (the
    engine settings' and the ``COMPAT`` fields', such as ``protocol``: runs before it used certseg's own), or what
    those runs did where the default has changed since (``settings.BEFORE_ADDED``: BatchNorm unfolded)."""
    own = {f.name: f.default for f in fields(BenchConfig) if f.metadata.get("compat")}
    return shared_settings(Settings()) | BEFORE_ADDED | {k: getattr(v, "value", v) for k, v in own.items()}


def shared_settings(settings: Settings) -> dict[str, Any]:
    """The engine settings every cell of a run shares (all but the grid's axes), JSON-ready.

    A results header written before a setting existed lacks its key; resuming compares it with
    ``shared_settings(Settings())``'s value, the default, which is what runs before the setting used.
    """
    return {k: v for k, v in settings.record().items() if k not in GRID_AXES}


def parse_size(text: str, option: str = "--size") -> tuple[int, int]:
    """``HxW`` (e.g. ``256x512``) → (H, W), for every bench option that takes an image size."""
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise InputError(f"{option} must be HEIGHTxWIDTH (e.g. 256x512), got {text!r}") from None
    if height < 1 or width < 1:
        raise InputError(f"{option} must be positive, got {text!r}")
    return height, width
