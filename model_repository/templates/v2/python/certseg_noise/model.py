"""noise: one image + (seed, start, count, σ) → ``count`` noisy copies, sample i with its own seeded noise.

Noise is a function of (root seed, sample index) only (``certseg.engine.sampling.NoiseSource``), so a retried
or re-split request regenerates exactly the same samples.
"""

import torch
from certseg_step import Step

from certseg.engine.sampling import NoiseSource
from certseg.engine.stages import add_noise


class TritonPythonModel:
    def initialize(self, args):
        self.step = Step(args)
        self.backend = self.step.parameter("noise_backend", "numpy-philox")
        self.max_count = int(self.step.parameter("max_count"))

    def run(self, request):
        step = self.step
        image = step.tensor(request, "IMAGE")
        seed, start, count = (int(step.scalar(request, name)) for name in ("SEED", "START", "COUNT"))
        sigma = float(step.scalar(request, "SIGMA"))
        if not 1 <= count <= self.max_count:
            raise ValueError(f"COUNT must be in [1, {self.max_count}], got {count}")
        if start < 0:
            raise ValueError(f"START must be >= 0, got {start}")
        noise = NoiseSource(seed, self.backend).batch(start, count, image.shape, step.device)
        return {
            "NOISY": add_noise(image.unsqueeze(0), noise, sigma),
            "IMAGE_SIZE": torch.tensor(image.shape[-2:], dtype=torch.int32),
        }

    def execute(self, requests):
        return [self.step.respond(request, self.run) for request in requests]
