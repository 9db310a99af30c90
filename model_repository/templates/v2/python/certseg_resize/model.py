"""resize: x_t and ε → x̂0 in [0, 1] at the segmenter's size → the segmenter's normalised input."""

from certseg_step import Step

from certseg.engine.denoise import denoiser_output
from certseg.engine.stages import segmenter_input


class TritonPythonModel:
    def initialize(self, args):
        self.step = Step(args)

    def run(self, request):
        step = self.step
        size = step.sizes(request, "SEG_SIZE")
        clean = denoiser_output(
            step.tensor(request, "X_T"), step.tensor(request, "EPS"), int(step.scalar(request, "TIMESTEP")),
            out_size=size, antialias=bool(step.scalar(request, "ANTIALIAS")),
        )
        return {"SEG_INPUT": segmenter_input(clean, size)}

    def execute(self, requests):
        return [self.step.respond(request, self.run) for request in requests]
