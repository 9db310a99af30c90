"""denoise (cpu profile): the denoiser's ONNX graph in ONNX Runtime, ε = unet(x_t, t); dynamically batched.

Input and output names are the graph's own (the config's: x_t first, then the timesteps), so a bring-your-own
file is served as given.
"""

from certseg_step import Step, batched, ort_model


class TritonPythonModel:
    def initialize(self, args):
        self.step = Step(args)
        self.x_t, self.timesteps = (i["name"] for i in self.step.config["input"])
        self.eps = self.step.config["output"][0]["name"]
        self.unet = ort_model(self.step, (self.x_t, self.timesteps))

    def run(self, **inputs):
        return {self.eps: self.unet(inputs[self.x_t], inputs[self.timesteps].reshape(-1))}

    def execute(self, requests):
        return batched(self.step, requests, (self.x_t, self.timesteps), self.run)
