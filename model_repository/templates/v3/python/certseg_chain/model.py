"""chain: the denoising steps after the first (``--denoise-steps K`` > 1), served.

The K - 1 further UNet calls go to ``certseg_denoise`` through BLS (the ensemble's own denoiser, dynamically
batched with everything else), and the loop between them is the engine's ``run_chain``, the one the in-process
runtimes run: so served and in-process ONNX certificates agree bit for bit. Each step's noise is the sample's own
(``certseg.engine.core.sampling.ReverseNoise`` of SEED from START), so a re-split or retried request draws exactly
the same. K = 1 passes its inputs through: today's one-step pipeline, unchanged.
"""

import torch
from certseg_step import Step, bls_model, schedule

from certseg.engine.core.sampling import NoiseSource, ReverseNoise
from certseg.engine.maths.denoise import denoise_chain, run_chain
from certseg.engine.maths.label_pipeline import MULTI_STEP_VARIANCE


class TritonPythonModel:
    def initialize(self, args):
        self.step = Step(args)
        self.backend = self.step.parameter("noise_backend", "numpy-philox")
        self.schedule = schedule(self.step)
        self.unet = bls_model(self.step, "certseg_denoise", *(self.step.parameter(f"denoiser_{name}")
                                                             for name in ("x_t", "timesteps", "eps")))

    def run(self, request):
        step = self.step
        x, eps = step.tensor(request, "X_T"), step.tensor(request, "EPS")
        t, steps = (int(step.scalar(request, name)) for name in ("TIMESTEP", "DENOISE_STEPS"))
        chain = denoise_chain(t, steps, variance=MULTI_STEP_VARIANCE, schedule=self.schedule)
        if steps == 1:
            valid = torch.ones(len(x), dtype=torch.bool)
        else:
            noise = ReverseNoise(NoiseSource(int(step.scalar(request, "SEED")), self.backend),
                                 int(step.scalar(request, "START")), len(x), step.device)
            x, eps, valid = run_chain(chain, x, eps, self.unet, noise)
        # run_chain's validity covers every output it read; certseg_resize checks the last ε itself (K = 1 too)
        return {"X_LAST": x, "EPS_LAST": eps, "TIMESTEP_LAST": torch.tensor([chain.last], dtype=torch.int64),
                "STEPS_VALID": valid.cpu()}

    def execute(self, requests):
        return [self.step.respond(request, self.run) for request in requests]
