"""prepare (SegCertify, no denoiser): noisy images in [0, 1] → the segmenter's normalised input.

The normalisation (mean, std, input range) is the segmenter's, from the config parameter ``normalization``.
SAMPLE_VALID (whether each noisy input is finite) feeds argmax the same per-sample validity as DenoiseCertify.
"""

from certseg_step import Step

from certseg.engine.maths.stages import IMAGENET, Normalization, finite_samples, segmenter_input


class TritonPythonModel:
    def initialize(self, args):
        self.step = Step(args)
        self.normalization = Normalization.from_json(self.step.parameter("normalization", IMAGENET.to_json()))

    def run(self, request):
        step = self.step
        noisy = step.tensor(request, "NOISY")
        size = step.sizes(request, "SEG_SIZE")
        step.check_bytes("the segmenter input", (len(noisy), 3, *size))
        return {"SEG_INPUT": segmenter_input(noisy, size, self.normalization),
                "SAMPLE_VALID": finite_samples(noisy).cpu()}

    def execute(self, requests):
        return [self.step.respond(request, self.run) for request in requests]
