"""The shipped models' architectures and scene size: small enough to train and certify on 2 CPU cores.

The configs are in the official vocabularies (the HRNet yaml ``MODEL`` node, guided-diffusion's ``create_model``
keywords) and travel inside the saved weights, so the engine builds them like any checkpoint.
"""

from __future__ import annotations

from typing import Any

SCENE_SIZE = (128, 256)
"""Resolution of the default procedural scenes (H, W): 2:1 like Cityscapes, small enough for CPU certification."""

SMALL_HRNET: dict[str, Any] = {
    "NAME": "seg_hrnet",
    "ALIGN_CORNERS": False,
    "EXTRA": {
        "FINAL_CONV_KERNEL": 1,
        "STAGE1": {"NUM_MODULES": 1, "NUM_RANCHES": 1, "BLOCK": "BOTTLENECK", "NUM_BLOCKS": [1],
                   "NUM_CHANNELS": [32], "FUSE_METHOD": "SUM"},
        "STAGE2": {"NUM_MODULES": 1, "NUM_BRANCHES": 2, "BLOCK": "BASIC", "NUM_BLOCKS": [2, 2],
                   "NUM_CHANNELS": [16, 32], "FUSE_METHOD": "SUM"},
        "STAGE3": {"NUM_MODULES": 1, "NUM_BRANCHES": 3, "BLOCK": "BASIC", "NUM_BLOCKS": [2, 2, 2],
                   "NUM_CHANNELS": [16, 32, 64], "FUSE_METHOD": "SUM"},
        "STAGE4": {"NUM_MODULES": 1, "NUM_BRANCHES": 4, "BLOCK": "BASIC", "NUM_BLOCKS": [2, 2, 2, 2],
                   "NUM_CHANNELS": [16, 32, 64, 128], "FUSE_METHOD": "SUM"},
    },
}
"""HRNetV2 structure (4 branches, fusion, 1/4-resolution head) at a width that trains on 2 CPU cores.
``NUM_RANCHES`` is the official HRNet yaml's own spelling for stage 1, kept so the shipped config stays as saved."""

SMALL_ADM: dict[str, Any] = {
    "image_size": 64,
    "num_channels": 32,
    "num_res_blocks": 1,
    "channel_mult": "1,2,2,2",
    "attention_resolutions": "16",
    "num_head_channels": 32,
    "learn_sigma": False,
    "class_cond": False,
    "use_scale_shift_norm": True,
    "resblock_updown": True,
    "dropout": 0.0,
    "use_fp16": False,
    "use_new_attention_order": False,
}
"""The guided-diffusion UNet at 64x64: ε-prediction only (the certifier uses ε; no learned variance)."""
