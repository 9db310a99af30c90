"""Evaluation protocols: how a dataset's images reach the certifier, so a table says which one it used.

``certseg`` (default): images keep their size (or ``--resize N`` squashes them), and ``--scale`` is a fraction
of the image size for both methods. ``peers``: what the SegCertify / DenoiseCertify code did, so their tables can
be reproduced without knowing the details:

- Pascal-Context: images and label maps squashed to 480 × 480 (aspect ignored; image bilinear, labels nearest),
  and SegCertify's segmenter input resized so its long side is 520 · scale (their ``BASE_SIZE``); DenoiseCertify
  resizes the denoised image to scale × the (squashed) image size.
- Cityscapes: SegCertify's long side is 2048 · scale, which on Cityscapes' 1024 × 2048 images is scale × the image
  size, certseg's own rule: the two protocols give the same numbers there.

The certificate is always per pixel at the image's (squashed) size; only the segmenter's input size changes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from certseg.bench.datasets.common import DatasetError
from certseg.engine.choices import Dataset, Method, Protocol
from certseg.engine.runtimes.settings import Settings


@dataclass(frozen=True)
class ProtocolPreset:
    """A protocol as it applies to one dataset."""

    protocol: Protocol
    squash: int | None = None
    """Images and label maps are resized to squash × squash before certification (None: kept as they are)."""
    segcertify_long_side: int | None = None
    """SegCertify's segmenter input long side at scale 1 (the peers' BASE_SIZE); None: scale × the image size."""
    image_long_side: int | None = None
    """The images' long side (after the squash) that ``segcertify_long_side`` is converted against."""

    def describe(self) -> str:
        """One line for the tables and the report."""
        parts = [f"squash to {self.squash}×{self.squash}" if self.squash else "images at their own size"]
        if self.segcertify_long_side is not None:
            parts.append(f"SegCertify segmenter long side {self.segcertify_long_side}·scale")
        parts.append("scale × image size" if self.segcertify_long_side is None else
                     "DenoiseCertify scale × image size")
        return f"{self.protocol.value} ({', '.join(parts)})"

    def engine_settings(self, settings: Settings) -> Settings:
        """The engine settings of one grid cell under this protocol: SegCertify's scale becomes the fraction of
        the image size that puts the segmenter input's long side at ``segcertify_long_side`` · scale."""
        if self.segcertify_long_side is None or settings.method != Method.segcertify:
            return settings
        assert self.image_long_side is not None
        return replace(settings, scale=settings.scale * self.segcertify_long_side / self.image_long_side)

    def check_image(self, image_id: str, size: tuple[int, int]) -> None:
        """Refuses an image whose long side is not the one the protocol converts against (one line)."""
        if self.image_long_side is not None and max(size) != self.image_long_side:
            raise DatasetError(
                f"{image_id} is {size[0]}x{size[1]}, but --protocol {self.protocol.value} assumes images with a long "
                f"side of {self.image_long_side} (use --protocol certseg for other sizes)"
            )


PEERS: dict[Dataset, ProtocolPreset] = {
    Dataset.cityscapes: ProtocolPreset(Protocol.peers, squash=None, segcertify_long_side=2048, image_long_side=2048),
    Dataset.pascal_context: ProtocolPreset(Protocol.peers, squash=480, segcertify_long_side=520, image_long_side=480),
}
"""The peers' protocol per dataset (REFERENCE: their Pascal-Context 480 × 480 squash and BASE_SIZE 520 / 2048)."""


def resolve_protocol(protocol: Protocol | str, dataset: Dataset, resize: int | None) -> ProtocolPreset:
    """The preset for ``dataset``; ``resize`` is ``--resize``, which only the certseg protocol takes freely."""
    protocol = Protocol(protocol)
    if protocol == Protocol.certseg:
        return ProtocolPreset(protocol, squash=resize)
    if dataset not in PEERS:
        raise DatasetError(
            f"--protocol peers reproduces the peers' {' and '.join(d.value for d in PEERS)} tables; the "
            f"{dataset.value} dataset has no peers' protocol (use --protocol certseg)"
        )
    preset = PEERS[dataset]
    if resize is not None and resize != preset.squash:
        raise DatasetError(
            f"--protocol peers squashes {dataset.value} images to "
            f"{'nothing' if preset.squash is None else f'{preset.squash}×{preset.squash}'}; drop --resize {resize}"
        )
    return preset
