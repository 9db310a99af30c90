"""certseg.export: ONNX / TensorRT export and the Triton model repository writer.

It sits above the engine (it imports ``certseg.engine``, never ``certseg.bench`` or ``certseg.training``). The
engine reaches into it at two points only: ``Session``'s ONNX runtime asks ``cache.cached_export`` for graphs
of a torch checkpoint, and ``certseg serve`` (a console entry point) asks ``default_repository`` for its
repository. ``tests/test_dependencies.py`` keeps it so.
"""
