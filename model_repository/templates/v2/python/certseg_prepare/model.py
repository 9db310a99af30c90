"""prepare (SegCertify, no denoiser): noisy images in [0, 1] → the segmenter's normalised input."""

from certseg_step import Step

from certseg.engine.stages import segmenter_input


class TritonPythonModel:
    def initialize(self, args):
        self.step = Step(args)

    def run(self, request):
        step = self.step
        return {"SEG_INPUT": segmenter_input(step.tensor(request, "NOISY"), step.sizes(request, "SEG_SIZE"))}

    def execute(self, requests):
        return [self.step.respond(request, self.run) for request in requests]
