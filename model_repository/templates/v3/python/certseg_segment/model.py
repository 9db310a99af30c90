"""segment (cpu profile): the segmenter's ONNX graph in ONNX Runtime, class scores; dynamically batched.

Input and output names are the graph's own (the config's), so a bring-your-own file is served as given.
"""

from certseg_step import Step, batched, ort_model


class TritonPythonModel:
    def initialize(self, args):
        self.step = Step(args)
        self.segmenter = ort_model(self.step)
        self.images = self.step.config["input"][0]["name"]
        self.logits = self.step.config["output"][0]["name"]

    def run(self, **inputs):
        return {self.logits: self.segmenter(inputs[self.images])}

    def execute(self, requests):
        return batched(self.step, requests, (self.images,), self.run)
