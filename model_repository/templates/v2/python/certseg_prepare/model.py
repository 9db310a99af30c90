"""prepare (SegCertify, no denoiser): noisy images in [0, 1] → the segmenter's normalised input.

SAMPLE_VALID (whether each noisy input is finite) feeds argmax the same per-sample validity as DenoiseCertify.
"""

from certseg_step import Step

from certseg.engine.stages import finite_samples, segmenter_input


class TritonPythonModel:
    def initialize(self, args):
        self.step = Step(args)

    def run(self, request):
        step = self.step
        noisy = step.tensor(request, "NOISY")
        size = step.sizes(request, "SEG_SIZE")
        step.check_bytes("the segmenter input", (len(noisy), 3, *size))
        return {"SEG_INPUT": segmenter_input(noisy, size), "SAMPLE_VALID": finite_samples(noisy).cpu()}

    def execute(self, requests):
        return [self.step.respond(request, self.run) for request in requests]
