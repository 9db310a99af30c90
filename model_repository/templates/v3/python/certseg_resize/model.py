"""resize: x_t and ε → x̂0 in [0, 1] at the segmenter's size → the segmenter's normalised input.

ᾱ comes from the denoiser's noise schedule (config parameter ``schedule``), the normalisation from the
segmenter's (``normalization``). Also answers SAMPLE_VALID: whether each sample's ε was finite, checked before
x̂0's clamp could hide it, here and at every earlier denoising step (STEPS_VALID from ``certseg_chain``).
"""

from certseg_step import Step, schedule

from certseg.engine.maths.denoise import denoiser_output
from certseg.engine.maths.stages import IMAGENET, Normalization, finite_samples, segmenter_input


class TritonPythonModel:
    def initialize(self, args):
        self.step = Step(args)
        self.normalization = Normalization.from_json(self.step.parameter("normalization", IMAGENET.to_json()))
        self.schedule = schedule(self.step)

    def run(self, request):
        step = self.step
        size = step.sizes(request, "SEG_SIZE")
        eps = step.tensor(request, "EPS")
        step.check_bytes("the segmenter input", (len(eps), 3, *size))
        clean = denoiser_output(
            step.tensor(request, "X_T"), eps, int(step.scalar(request, "TIMESTEP")),
            out_size=size, antialias=bool(step.scalar(request, "ANTIALIAS")), schedule=self.schedule,
        )
        return {"SEG_INPUT": segmenter_input(clean, size, self.normalization),
                "SAMPLE_VALID": finite_samples(eps[:, :3]).cpu() & step.tensor(request, "STEPS_VALID").cpu()}

    def execute(self, requests):
        return [self.step.respond(request, self.run) for request in requests]
