"""User-facing errors: each message is one line that names the problem; the CLIs print it and exit non-zero."""


class CertsegError(Exception):
    """Base class of every error certseg reports to users without a traceback."""


class CertificationError(CertsegError, ValueError):
    """Parameters or inputs that cannot give a valid certificate."""


class InputError(CertsegError, ValueError):
    """An input file or array that cannot be used (unreadable image, wrong channels, bad shape)."""


class CheckpointError(CertsegError, ValueError):
    """A checkpoint that does not fit the model (missing, unexpected or mis-shaped keys; unreadable file)."""


class ServerError(CertsegError, RuntimeError):
    """A Triton server that is unreachable, lacks a model, or failed a request beyond the retry budget."""


class ModelError(CertsegError, RuntimeError):
    """A model that failed while running: an ONNX graph that onnxruntime could not run on the inputs the pipeline
    gave it, or whose outputs are not the shape it declares."""
