"""The official HRNet code's golden outputs (``reference/golden/hrnet_small.*``) as a check of a rewritten model."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from certseg.engine.models.hrnet import HRNetV2, build_hrnet


def assert_golden_after(golden: Path, rewrite: Callable[[HRNetV2], None]) -> nn.Module:
    """Load the golden checkpoint, ``rewrite`` the model in place, and check it still gives the official code's
    outputs (within 1e-4, argmax equal) on both golden inputs (one of them of odd size); returns the model."""
    config = json.loads((golden / "hrnet_small.json").read_text())
    arrays = np.load(golden / "hrnet_small.npz")
    net = build_hrnet(config["MODEL"], config["DATASET"]["NUM_CLASSES"]).eval()
    net.load_state_dict({k: torch.from_numpy(arrays[k]) for k in arrays.files if "." in k}, strict=True)
    rewrite(net)
    for inp, out in (("x", "out"), ("x_odd", "out_odd")):
        with torch.no_grad():
            got = net(torch.from_numpy(arrays[inp]))
        want = torch.from_numpy(arrays[out])
        assert (got - want).abs().max().item() <= 1e-4
        assert torch.equal(got.argmax(1), want.argmax(1))
    return net
