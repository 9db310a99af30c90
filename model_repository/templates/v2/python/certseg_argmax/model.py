"""argmax: logits at any resolution → label maps at the image's size, uint8 (uint16 when K > 255).

Fails closed (``certseg.engine.stages.labels_from_logits``): non-finite scores, and samples whose upstream
output was non-finite (SAMPLE_VALID false), give the label K, which never counts as an agreement.
"""

import torch
from certseg_step import Step

from certseg.engine.stages import labels_from_logits


class TritonPythonModel:
    def initialize(self, args):
        self.step = Step(args)

    def run(self, request):
        step = self.step
        logits = step.tensor(request, "LOGITS")
        valid = step.tensor(request, "SAMPLE_VALID").reshape(-1)
        if len(valid) != len(logits):
            raise ValueError(f"SAMPLE_VALID has {len(valid)} entries for {len(logits)} samples")
        labels = labels_from_logits(logits, step.sizes(request, "IMAGE_SIZE"), valid)
        return {"LABELS": labels if labels.dtype == torch.uint8 else labels.cpu().numpy()}

    def execute(self, requests):
        return [self.step.respond(request, self.run) for request in requests]
