"""certseg.engine: certifying segmentation, in layers that import only downwards.

    commands/   the ``certseg`` CLI (certify, serve) and the options both CLIs share
    files/      images in, certificates out (label maps, overlays, JSON, radius maps)
    runtimes/   where samples are labelled (torch, ONNX Runtime, Triton), the session over them, its settings,
                the memory estimate and the embedded tritonserver
    models/     the architectures, checkpoints, the registry and what models state about themselves
    core/       the certification itself: noise streams, counting, the test, radii, certified metrics
    maths/      the stage maths every runtime runs (noise, resize, normalise, one-step denoise, argmax)
    (top level) errors, enums, limits, hashes, caches: what every layer may use

Modules that lived at the top level before the split keep their old names (``certseg.engine.moved``).
"""

from certseg.engine import moved

moved.install()
