"""``certseg certify A B dir/ 'glob/*.png'``: many images in one command, models loaded once.

Users certify folders, not files. One session serves every image (a session builds a runtime per image size),
so the models load once. Everything cheap is checked for every image before the first sample: the output folder
(once: a bad one stops the run), each image's header (readable, within ``--max-pixels``, enough pixels for n)
and its label map's presence. An image that fails then, or later (undecodable pixels, a label map of another
size, a memory estimate that does not fit), is reported in one line and skipped; the others go on, and the run
says at the end how many failed. Each image's outputs are written as soon as it is certified, so an interrupted
run keeps what it finished, and ``skip_existing`` resumes it.

Seeds: a run of one image file uses the seed given as that image's seed, as ``run_certify`` always did. A run of
several images (or a folder or pattern) has a root seed S (given, or drawn once), and image k of the run's list
(``certseg.engine.files.image_list``) gets ``image_seed(S, k)``; its JSON records ``seed``, ``root_seed`` and
``image_index``, so ``certseg certify IMAGE --seed <seed>`` reproduces it alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from certseg.engine.commands.certify_command import (
    CertifyRequest,
    certify_loaded,
    open_session,
    progress_bar,
    read_target,
)
from certseg.engine.errors import CertsegError, InputError, ServerError
from certseg.engine.files.image_list import ImageList, expand_images
from certseg.engine.files.images import image_pixels, read_image
from certseg.engine.files.outputs import check_output_folder, output_paths
from certseg.engine.runtimes.process import check_threads
from certseg.engine.runtimes.settings import Settings
from certseg.engine.seeds import image_seed, new_root_seed

LABEL_SUFFIX = ".png"
"""With several images, ``labels`` is a folder and image ``<stem>.*`` takes ``<labels>/<stem>.png``."""


class Status(StrEnum):
    certified = "certified"
    skipped = "skipped"
    failed = "failed"


@dataclass(frozen=True)
class ImageOutcome:
    """What became of one image of a run."""

    path: Path
    index: int
    """Its place in the run's list (the k of its seed)."""
    status: Status
    message: str
    """The line printed for it: its summary, why it failed, or why it was skipped."""
    seed: int | None = None
    """The seed it was (or would have been) certified with; None where a one-file run without ``seed`` would have
    drawn one."""
    report: dict[str, Any] | None = None
    """The JSON written for it, when certified."""

    @property
    def num_pixels(self) -> int:
        return 0 if self.report is None else int(self.report["num_pixels"])

    @property
    def certified_pixels(self) -> int:
        if self.report is None:
            return 0
        return self.num_pixels - int(self.report["per_class_certified_pixels"]["abstain"])


@dataclass(frozen=True)
class ManyResult:
    """Every image's outcome, in the run's order, and the run's root seed (None for a one-file run)."""

    images: tuple[ImageOutcome, ...]
    root_seed: int | None

    def count(self, status: Status) -> int:
        return sum(outcome.status == status for outcome in self.images)

    @property
    def failed(self) -> int:
        return self.count(Status.failed)

    def summary(self) -> str:
        """The run's last line: images certified, skipped and failed, and the certified share of their pixels."""
        pixels = sum(outcome.num_pixels for outcome in self.images)
        certified = sum(outcome.certified_pixels for outcome in self.images)
        share = f"{100 * certified / pixels:.1f}%" if pixels else "none"
        line = (f"{self.count(Status.certified)} certified, {self.count(Status.skipped)} skipped, {self.failed} "
                f"failed of {len(self.images)} images; certified {share} of their {pixels:,} pixels")
        return line + ("" if self.root_seed is None else f"; root seed {self.root_seed}")


def _labels_for(path: Path, labels: Path | None, listed: ImageList) -> Path | None:
    """An image's label map: ``labels`` itself in a one-file run, ``<labels>/<stem>.png`` otherwise."""
    if labels is None or listed.single_file:
        return labels
    return labels / f"{path.stem}{LABEL_SUFFIX}"


def _failure(error: BaseException, path: Path) -> str:
    """``<path>: <reason>``: the message, prefixed with the image's path unless it names it already."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return text if text.startswith(str(path)) else f"{path}: {text}"


def certify_many(
    images: Sequence[str | Path] | ImageList,
    settings: Settings | None = None,
    *,
    seed: int | None = None,
    out: Path = Path("certseg-out"),
    labels: Path | None = None,
    skip_existing: bool = False,
    on_image: Callable[[ImageOutcome], object] | None = None,
    **options: Any,
) -> ManyResult:
    """Certify files, folders and glob patterns (``images``) with one session; see the module docstring.

    ``options`` are the other ``CertifyRequest`` fields (``radius_map``, ``servers``, ``threads``, ``progress``,
    ...), the same for every image. ``on_image`` hears each outcome as it happens (the CLI prints its line).
    Raises, with nothing more certified, on what concerns the whole run: bad settings, no image found, two images
    with one stem, a bad ``out`` or ``labels`` folder, models or servers that cannot be used.
    """
    labels = None if labels is None else Path(labels)
    template = CertifyRequest(image=Path(), settings=settings or Settings(), seed=seed, out=Path(out),
                              labels=labels, **options)
    check_threads(template.threads)
    template.settings.validate(1)  # the settings themselves; enough samples for each image's pixels: below
    listed = images if isinstance(images, ImageList) else expand_images(images)
    if labels is not None and not listed.single_file and not labels.is_dir():
        raise InputError(f"--labels {labels}: with several images, give a folder holding <stem>{LABEL_SUFFIX} "
                         "for each image")
    check_output_folder(template.out)
    root = seed if listed.single_file else (new_root_seed() if seed is None else seed)
    outcomes: list[ImageOutcome | None] = [None] * len(listed.paths)

    def done(outcome: ImageOutcome) -> None:
        outcomes[outcome.index] = outcome
        if on_image is not None:
            on_image(outcome)

    pending: list[tuple[int, CertifyRequest, dict[str, int]]] = []
    for index, path in enumerate(listed.paths):
        request = replace(template, image=path, labels=_labels_for(path, labels, listed),
                          seed=root if listed.single_file else image_seed(root, index))
        if skip_existing and output_paths(template.out, path.stem).report.exists():
            done(ImageOutcome(path, index, Status.skipped, f"{path}: skipped, {path.stem}.json exists in "
                              f"{template.out}", request.seed))
            continue
        try:
            request.settings.validate(image_pixels(path, max_pixels=request.max_pixels))
            if request.labels is not None and not request.labels.is_file():
                raise InputError(f"{path}: no label map {request.labels}")
        except CertsegError as error:
            done(ImageOutcome(path, index, Status.failed, _failure(error, path), request.seed))
            continue
        seeding = {} if listed.single_file else {"root_seed": root, "image_index": index}
        pending.append((index, request, seeding))
    if pending:
        _certify_pending(pending, template, done)
    return ManyResult(tuple(o for o in outcomes if o is not None), None if listed.single_file else root)


def _certify_pending(
    pending: list[tuple[int, CertifyRequest, dict[str, int]]],
    template: CertifyRequest,
    done: Callable[[ImageOutcome], None],
) -> None:
    """Certify the images that passed the checks, on one session, under one progress bar over all samples."""
    per_image = template.settings.n0 + template.settings.n
    bar = SampleBar(len(pending) * per_image) if template.progress else None
    session = open_session(template)
    try:
        with bar or nullcontext():
            for index, request, seeding in pending:
                path = request.image
                drawn = 0

                def advance(count: int) -> None:
                    nonlocal drawn
                    drawn += count
                    if bar is not None:
                        bar.advance(count)

                if bar is not None:
                    bar.show(path.name)
                try:
                    image = read_image(path, max_pixels=request.max_pixels)
                    made = certify_loaded(request, session, image, read_target(request, image), advance, seeding)
                except ServerError:
                    raise  # the servers, not this image: the images after it would fail the same way
                except CertsegError as error:
                    if bar is not None:
                        bar.drop(per_image - drawn)  # its samples will not be drawn
                    done(ImageOutcome(path, index, Status.failed, _failure(error, path), request.seed))
                    continue
                seed = int(made.report["seed"])  # as used: drawn in a one-file run without a seed
                done(ImageOutcome(path, index, Status.certified, f"{path}: {made.summary}", seed, made.report))
    finally:
        session.close()


class SampleBar:
    """The run's one progress bar: every sample of every image, the image at hand named beside it."""

    def __init__(self, total: int) -> None:
        self.progress = progress_bar()
        self.total = total
        self.task = self.progress.add_task("", total=total)

    def __enter__(self) -> SampleBar:
        self.progress.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.progress.stop()

    def show(self, name: str) -> None:
        self.progress.update(self.task, description=name)

    def advance(self, count: int) -> None:
        self.progress.advance(self.task, count)

    def drop(self, count: int) -> None:
        """Samples that will not be drawn after all (an image that failed): out of the total."""
        self.total -= count
        self.progress.update(self.task, total=self.total)
