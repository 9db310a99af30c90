"""``python -m certseg.training segmenter|denoiser --name NAME ...``: train a default model."""

from certseg.training.cli import main

main()
