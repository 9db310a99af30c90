"""``python -m certseg.bench.train segmenter|denoiser ...``: the training command the shipped weights' manifest
records, kept as the same command as ``python -m certseg.training`` (the trainers live in ``certseg.training``)."""

from certseg.training.cli import main

if __name__ == "__main__":
    main("python -m certseg.bench.train")
