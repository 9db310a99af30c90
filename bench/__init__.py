"""certseg.bench: datasets, the paper's evaluation protocol and throughput benchmarks."""
