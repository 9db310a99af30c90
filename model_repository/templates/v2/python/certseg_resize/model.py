"""resize: x_t and ε → x̂0 in [0, 1] at the segmenter's size → the segmenter's normalised input.

Also answers SAMPLE_VALID: whether each sample's ε was finite, checked before x̂0's clamp could hide it.
"""

from certseg_step import Step

from certseg.engine.denoise import denoiser_output
from certseg.engine.stages import finite_samples, segmenter_input


class TritonPythonModel:
    def initialize(self, args):
        self.step = Step(args)

    def run(self, request):
        step = self.step
        size = step.sizes(request, "SEG_SIZE")
        eps = step.tensor(request, "EPS")
        step.check_bytes("the segmenter input", (len(eps), 3, *size))
        clean = denoiser_output(
            step.tensor(request, "X_T"), eps, int(step.scalar(request, "TIMESTEP")),
            out_size=size, antialias=bool(step.scalar(request, "ANTIALIAS")),
        )
        return {"SEG_INPUT": segmenter_input(clean, size), "SAMPLE_VALID": finite_samples(eps[:, :3]).cpu()}

    def execute(self, requests):
        return [self.step.respond(request, self.run) for request in requests]
