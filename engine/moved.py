"""Where modules moved when ``certseg.engine`` was split into sub-packages, so their old names keep working.

``certseg.engine.certify`` (and the other names below) are public: the README, user code and Triton
repositories rendered by earlier releases import them. Each old name is the new module itself (same object,
so patching either patches both), imported only when the old name is.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import CodeType, ModuleType

MOVED: dict[str, str] = {
    "certify": "core.certify",
    "counting": "core.counting",
    "metrics": "core.metrics",
    "pipeline": "core.pipeline",
    "radius": "core.radius",
    "sampling": "core.sampling",
    "denoise": "maths.denoise",
    "label_pipeline": "maths.label_pipeline",
    "stages": "maths.stages",
    "certify_record": "runtimes.certify_record",
    "memory": "runtimes.memory",
    "serve": "runtimes.serve",
    "session": "runtimes.session",
    "settings": "runtimes.settings",
    "io": "files.images",
    "outputs": "files.outputs",
    "png16": "files.png16",
    "radius_outputs": "files.radius_outputs",
    "certify_command": "commands.certify_command",
    "cli": "commands.cli",
    "cli_common": "commands.cli_common",
}
"""old module name under certseg.engine -> its new name under certseg.engine."""

PREFIX = "certseg.engine."


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(self.target)

    def exec_module(self, module: ModuleType) -> None:
        """The module ran when its new name was imported."""

    def get_code(self, fullname: str) -> CodeType | None:
        """The new module's code, so ``python -m certseg.engine.<old>`` still runs it."""
        spec = importlib.util.find_spec(self.target)
        loader = None if spec is None else spec.loader
        return loader.get_code(self.target) if isinstance(loader, importlib.abc.InspectLoader) else None


class MovedModules(importlib.abc.MetaPathFinder):
    """Finds ``certseg.engine.<old>`` as the module now at ``certseg.engine.<new>``."""

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith(PREFIX) or fullname[len(PREFIX):] not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, _Alias(PREFIX + MOVED[fullname[len(PREFIX):]]))


def install() -> None:
    if not any(isinstance(finder, MovedModules) for finder in sys.meta_path):
        sys.meta_path.append(MovedModules())
