"""Held-out scenes written in Cityscapes' folder layout, so ``certseg-bench`` (and Cityscapes' own evaluator)
read them like real data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from certseg.training.scenes.labels import CLASSES, IGNORE_INDEX, PALETTE
from certseg.training.scenes.render import GENERATOR_VERSION, generate_scene, to_uint8
from certseg.training.scenes.seeds import HELD_OUT_SEED_OFFSET, held_out_seed

CITY = "procedural"


def save_png(path: Path, array: np.ndarray) -> None:
    """Write (H,W,3) or (H,W) uint8 as an 8-bit PNG (RGB or greyscale 'L')."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(array), mode="RGB" if array.ndim == 3 else "L").save(path)


def scene_name(j: int) -> str:
    """Cityscapes-style stem of held-out scene ``j`` (city, sequence, frame)."""
    return f"{CITY}_000000_{j:06d}"


def write_cityscapes_layout(
    root: Path, *, num_images: int, height: int, width: int, split: str = "val", first_held_out: int = 0
) -> list[Path]:
    """Render held-out scenes into the Cityscapes folder layout so ``certseg-bench`` reads them like real data.

    Writes ``leftImg8bit/{split}/procedural/*_leftImg8bit.png`` (RGB) and
    ``gtFine/{split}/procedural/*_gtFine_labelTrainIds.png`` (ids index ``CLASSES``), plus ``procedural.json``
    (generator version, classes, palette, seeds, size per split). Returns the image paths in order.
    """
    root = Path(root)
    manifest_path = root / "procedural.json"
    manifest = {}
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("generator_version") != GENERATOR_VERSION:
            manifest = {}  # stale: written by another generator version
    manifest.update(
        generator_version=GENERATOR_VERSION,
        classes=list(CLASSES),
        palette=PALETTE.tolist(),
        ignore_index=IGNORE_INDEX,
        held_out_seed_offset=HELD_OUT_SEED_OFFSET,
    )
    paths, names, seeds = [], [], []
    for j in range(first_held_out, first_held_out + num_images):
        seed = held_out_seed(j)
        scene = generate_scene(seed, height, width)
        name = scene_name(j)
        image_path = root / "leftImg8bit" / split / CITY / f"{name}_leftImg8bit.png"
        save_png(image_path, to_uint8(scene.image))
        save_png(root / "gtFine" / split / CITY / f"{name}_gtFine_labelTrainIds.png", scene.labels)
        paths.append(image_path)
        names.append(name)
        seeds.append(seed)
    splits = manifest.setdefault("splits", {})
    splits[split] = {"city": CITY, "height": height, "width": width, "names": names, "seeds": seeds}
    root.mkdir(parents=True, exist_ok=True)
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    return paths
