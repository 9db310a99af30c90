"""certseg.training: what makes the shipped default weights (``engine/weights/``).

``scenes`` draws the procedural street scenes they are trained on (also the bench's default dataset and the
shipped sample); ``python -m certseg.training segmenter|denoiser --name NAME`` trains a model and records it in
the weights' manifest. Above the engine: it imports ``certseg.engine`` and nothing else of certseg.
"""
