"""The stage maths, written once: noise, resizes, normalisation, the diffusion schedule and one-step denoise,
fail-closed argmax, and the label pipeline that chains them around the models. Torch, ONNX export and the
Triton step models all run these functions."""
