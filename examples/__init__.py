"""The shipped sample scene (held-out procedural scene 9992 and its labels; ``python -m certseg.bench.examples``
writes them). A package only so that an installed certseg finds them with ``importlib.resources``."""
