"""argmax: logits at any resolution → label maps at the image's size, uint8 (uint16 when K > 255).

Fails closed (``certseg.engine.maths.stages.labels_from_logits``): non-finite scores, and samples whose upstream
output was non-finite (SAMPLE_VALID false), give the label K, which never counts as an agreement. Samples are
upsampled one at a time (K x H x W float32 each, checked against the request limit), so a request's memory does
not grow with K x COUNT.
"""

import torch
from certseg_step import Step

from certseg.engine.maths.stages import label_dtype, labels_from_logits


class TritonPythonModel:
    def initialize(self, args):
        self.step = Step(args)

    def run(self, request):
        step = self.step
        logits = step.tensor(request, "LOGITS")
        valid = step.tensor(request, "SAMPLE_VALID").reshape(-1)
        if len(valid) != len(logits):
            raise ValueError(f"SAMPLE_VALID has {len(valid)} entries for {len(logits)} samples")
        size = step.sizes(request, "IMAGE_SIZE")
        step.check_bytes("one sample's upsampled scores", (logits.shape[1], *size))
        labels = torch.empty((len(logits), *size), dtype=label_dtype(logits.shape[1]), device=logits.device)
        for i in range(len(logits)):
            labels[i] = labels_from_logits(logits[i : i + 1], size, valid[i : i + 1])[0]
        return {"LABELS": labels if labels.dtype == torch.uint8 else labels.cpu().numpy()}

    def execute(self, requests):
        return [self.step.respond(request, self.run) for request in requests]
