"""noise: one image + (seed, start, count, σ) → ``count`` noisy copies, sample i with its own seeded noise.

Noise is a function of (root seed, sample index) only (``certseg.engine.core.sampling.NoiseSource``), so a retried
or re-split request regenerates exactly the same samples. A grayscale IMAGE (1, H, W) gets its noise in its own
channel, replicated to RGB after, so its certificate holds in its own pixel space.

Sizes are checked before anything is allocated: the noisy RGB copies (COUNT × 3 × H × W float32) are the largest
tensor of a request, and the server keeps several copies of them per request in flight (this step's output,
the ensemble's copy, the next step's input), so a request whose copies would exceed the ``max_request_bytes``
parameter is answered with an error instead of exhausting the server's memory. The copies are written one
sample at a time into the output, without batch-sized temporaries.
"""

import math

import torch
from certseg_step import Step

from certseg.engine.core.sampling import NoiseSource
from certseg.engine.maths.stages import add_noise, to_rgb


class TritonPythonModel:
    def initialize(self, args):
        self.step = Step(args)
        self.backend = self.step.parameter("noise_backend", "numpy-philox")
        self.max_count = int(self.step.parameter("max_count"))
        self.max_bytes = int(self.step.parameter("max_request_bytes"))

    def check(self, shape, start: int, count: int, sigma: float) -> None:
        """Refuse, in one line that names the limit, what this step cannot or must not compute."""
        if len(shape) != 3 or shape[0] not in (1, 3) or min(shape) < 1:
            raise ValueError(f"IMAGE must be (3, H, W) RGB or (1, H, W) gray, every side >= 1, got {tuple(shape)}")
        if not 1 <= count <= self.max_count:
            raise ValueError(f"COUNT must be in [1, {self.max_count}], got {count}")
        if start < 0:
            raise ValueError(f"START must be >= 0, got {start}")
        if not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"SIGMA must be finite and > 0, got {sigma}")
        needed = count * 3 * shape[1] * shape[2] * 4  # NOISY is RGB whatever the image's channels
        if needed > self.max_bytes:
            raise ValueError(
                f"COUNT {count} x NOISY 3x{shape[1]}x{shape[2]} float32 = {needed} bytes exceeds this "
                f"repository's max_request_bytes = {self.max_bytes} (certseg serve / certseg-export "
                "--max-request-bytes N raises it; clients split requests to fit)"
            )

    def run(self, request):
        step = self.step
        seed, start, count = (int(step.scalar(request, name)) for name in ("SEED", "START", "COUNT"))
        sigma = float(step.scalar(request, "SIGMA"))
        image = step.tensor(request, "IMAGE")
        self.check(image.shape, start, count, sigma)
        source = NoiseSource(seed, self.backend)
        noisy = torch.empty((count, 3, *image.shape[1:]), dtype=torch.float32, device=step.device)
        for i in range(count):  # noise in the image's own channels, gray replicated to RGB after it
            noisy[i] = to_rgb(add_noise(image, source.sample(start + i, image.shape, step.device), sigma)[None])[0]
        return {"NOISY": noisy, "IMAGE_SIZE": torch.tensor(image.shape[-2:], dtype=torch.int32)}

    def execute(self, requests):
        return [self.step.respond(request, self.run) for request in requests]
