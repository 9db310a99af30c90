"""The seeds of a run: a fresh root seed when the user gave none, and the seed of the k-th image of a run.

One rule for every command that certifies several images (``certseg certify`` with several images,
``certseg-bench``): image ``index`` gets ``image_seed(S, index)`` = the first 64-bit word of
``numpy.random.SeedSequence([S, index])``, shifted right by one (63 bits, like a drawn root seed). So every image
of a run gets its own, independent noise from one recorded root seed ``S``, and ``certseg certify IMAGE --seed
<that image's seed>`` reproduces its certificate alone. numpy only: the bench's ``--help`` imports this.
"""

from __future__ import annotations

import secrets

import numpy as np

from certseg.engine.errors import InputError


def new_root_seed() -> int:
    """A fresh 63-bit root seed for runs where the user gave none (it is recorded in every result)."""
    return secrets.randbits(63)


def image_seed(root_seed: int, index: int) -> int:
    """The root seed of image ``index`` of a run whose root seed is ``root_seed`` (see the module docstring)."""
    if root_seed < 0 or index < 0:
        raise InputError(f"--seed and image indices must be >= 0, got {root_seed}, {index}")
    return int(np.random.SeedSequence([int(root_seed), int(index)]).generate_state(1, np.uint64)[0] >> np.uint64(1))
