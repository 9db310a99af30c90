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


def first_line(error: BaseException, *, with_type: bool = False, limit: int | None = None) -> str:
    """The first line of an exception's message (gRPC errors: their ``message()``), for one-line reports.

    ``with_type`` prefixes the class name (``ValueError: ...``); an empty message gives the class name alone.
    """
    message = error.message() if callable(getattr(error, "message", None)) else str(error)
    lines = (message or "").strip().splitlines()
    text = lines[0][:limit] if lines else ""
    if not text:
        return error.__class__.__name__
    return f"{error.__class__.__name__}: {text}" if with_type else text
