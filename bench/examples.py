"""Write the shipped sample scene: ``python -m certseg.bench.examples [--out examples]``.

``examples/street.png`` and ``examples/street_labels.png`` are held-out procedural scene 9992 at the default
models' resolution, far from the held-out indices the benchmark uses by default (0, 1, 2, ...).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import typer
from PIL import Image

from certseg.training import scenes
from certseg.training.architectures import SCENE_SIZE

EXAMPLE_HELD_OUT_INDEX = 9992


def write_example(out: Path = Path("examples")) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    scene = scenes.generate_scene(scenes.held_out_seed(EXAMPLE_HELD_OUT_INDEX), *SCENE_SIZE)
    image_path, labels_path = out / "street.png", out / "street_labels.png"
    Image.fromarray(scenes.to_uint8(scene.image)).save(image_path)
    Image.fromarray(scene.labels.astype(np.uint8), mode="L").save(labels_path)
    return image_path, labels_path


if __name__ == "__main__":
    typer.run(write_example)
