"""scale: noisy images in [0, 1] → the denoiser's input x_t = sqrt(ᾱ_t*)·resize(2x - 1), plus its timesteps.

ᾱ comes from the denoiser's noise schedule (config parameter ``schedule``).
"""

import torch
from certseg_step import Step, schedule

from certseg.engine.maths.denoise import denoiser_input


class TritonPythonModel:
    def initialize(self, args):
        self.step = Step(args)
        self.size = int(self.step.parameter("denoiser_size"))
        self.schedule = schedule(self.step)

    def run(self, request):
        step = self.step
        t = int(step.scalar(request, "TIMESTEP"))
        x_t = denoiser_input(
            step.tensor(request, "NOISY"), t, denoiser_size=self.size,
            antialias=bool(step.scalar(request, "ANTIALIAS")), schedule=self.schedule,
        )
        return {"X_T": x_t, "TIMESTEPS": torch.full((len(x_t), 1), t, dtype=torch.int64, device=x_t.device)}

    def execute(self, requests):
        return [self.step.respond(request, self.run) for request in requests]
