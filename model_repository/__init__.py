"""Versioned Triton model-repository templates (``templates/v<N>/``), rendered by ``certseg.export.repository``.

A package only so that an installed certseg can find the templates with ``importlib.resources``.
"""
