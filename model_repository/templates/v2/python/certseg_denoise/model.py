"""denoise (cpu profile): the denoiser's ONNX graph in ONNX Runtime, ε = unet(x_t, t); dynamically batched."""

from certseg_step import Step, batched, ort_model


class TritonPythonModel:
    def initialize(self, args):
        self.step = Step(args)
        self.unet = ort_model(self.step)

    def run(self, x_t, timesteps):
        return {"eps": self.unet(x_t, timesteps.reshape(-1))}

    def execute(self, requests):
        return batched(self.step, requests, ("x_t", "timesteps"), self.run)
