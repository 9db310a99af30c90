"""How [0, 1] pixels become a segmenter's input (``Normalization``): part of every pipeline spec and model record.

Plain values, no torch: records, model descriptions and clients of a server use them; the tensor maths that
applies them is ``certseg.engine.maths.stages.normalize`` (which re-exports these names).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Normalization:
    """How [0, 1] pixels become a segmenter's input: x' = (lo + x·(hi - lo) - mean) / std per channel.

    ``mean`` and ``std`` are in the units of ``input_range`` = (lo, hi), the range the model reads pixels in:
    (0, 1) for torchvision-style models, (0, 255) for mmseg-style ones (mean 123.675, ...). It is part of the
    pipeline spec (and so of every record), because it is part of the classifier being certified.
    """

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    input_range: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        mean, std = tuple(float(v) for v in self.mean), tuple(float(v) for v in self.std)
        low, high = (float(v) for v in self.input_range)
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (R, G, B), got {len(mean)} and {len(std)}")
        if not all(math.isfinite(v) for v in (*mean, *std, low, high)):
            raise ValueError("mean, std and the input range must be finite numbers")
        if min(std) <= 0:
            raise ValueError(f"std must be > 0, got {list(std)}")
        if not low < high:
            raise ValueError(f"the input range must be (low, high) with low < high, got {[low, high]}")
        if not all(low <= m <= high for m in mean):
            raise ValueError(f"mean {list(mean)} lies outside the input range {[low, high]}: give mean and std in "
                             "the range's units (a [0, 255] mean such as 123.675 needs input range [0, 255])")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "input_range", (low, high))

    def to_json(self) -> str:
        return json.dumps({"mean": list(self.mean), "std": list(self.std), "input_range": list(self.input_range)})

    @classmethod
    def from_json(cls, text: str) -> Normalization:
        data = json.loads(text)
        return cls(tuple(data["mean"]), tuple(data["std"]), tuple(data["input_range"]))


IMAGENET = Normalization()
"""The shipped and official models' normalisation: ImageNet statistics on [0, 1] pixels."""
