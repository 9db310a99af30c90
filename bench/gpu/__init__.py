"""The one-shot GPU suite's parts (entry point: ``certseg.bench.gpu_suite``)."""
