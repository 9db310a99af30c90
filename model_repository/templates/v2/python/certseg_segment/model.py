"""segment (cpu profile): the segmenter's ONNX graph in ONNX Runtime, logits per class; dynamically batched."""

from certseg_step import Step, batched, ort_model


class TritonPythonModel:
    def initialize(self, args):
        self.step = Step(args)
        self.segmenter = ort_model(self.step)

    def run(self, images):
        return {"logits": self.segmenter(images)}

    def execute(self, requests):
        return batched(self.step, requests, ("images",), self.run)
