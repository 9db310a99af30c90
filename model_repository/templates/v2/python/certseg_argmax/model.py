"""argmax: logits at any resolution → label maps at the image's size, uint8 (uint16 when K > 256)."""

import torch
from certseg_step import Step

from certseg.engine.stages import labels_from_logits


class TritonPythonModel:
    def initialize(self, args):
        self.step = Step(args)

    def run(self, request):
        step = self.step
        labels = labels_from_logits(step.tensor(request, "LOGITS"), step.sizes(request, "IMAGE_SIZE"))
        return {"LABELS": labels if labels.dtype == torch.uint8 else labels.cpu().numpy()}

    def execute(self, requests):
        return [self.step.respond(request, self.run) for request in requests]
