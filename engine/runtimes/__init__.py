"""Runtimes: where the label maps of a sample range are computed (in-process torch, ONNX Runtime, Triton)."""
