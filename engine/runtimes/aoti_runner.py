"""An AOTInductor package runner that lets go of Python's GIL while it runs (a small C++ extension, built once).

Why: torch's own runner (``AOTIModelPackageLoader.run`` / ``boxed_run``) holds the GIL for the whole call, so the
runtime's helper thread (``sampling.LocalRuntime.overlaps``), whose stage maths need the GIL between torch ops,
waits for every model call to end. Measured on the shipped HRNet, 1024×2048, bf16, one thread: a Python thread ran
at 1.6% of its idle rate during torch's call and at its full rate during this one; the outputs are bit for bit the
same (the same loader runs the same package). It is built on first use with torch's C++ extension tools (about
20 s; cached by torch under ``TORCH_EXTENSIONS_DIR``); where it cannot be built (no compiler), ``native_runner``
returns None and compiled models run in one thread.
"""

from __future__ import annotations

import functools
import hashlib
import sys
from typing import Any

import torch

SOURCE = r"""
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/python.h>

namespace {
// torch's package loader, with the call made outside the GIL (the loader's container is thread-safe).
class Runner {
 public:
  Runner(const std::string& path, int64_t device_index)
      : loader_(path, "model", false, 1, static_cast<c10::DeviceIndex>(device_index)) {}
  std::vector<at::Tensor> run(const std::vector<at::Tensor>& inputs) {
    pybind11::gil_scoped_release release;
    return loader_.run(inputs);
  }
  std::vector<std::string> constant_fqns() { return loader_.get_constant_fqns(); }
  std::unordered_map<std::string, std::string> metadata() { return loader_.get_metadata(); }
  std::vector<std::string> call_spec() { return loader_.get_call_spec(); }
  void load_constants(std::unordered_map<std::string, at::Tensor> constants, bool check_full_update,
                      bool user_managed) {
    loader_.load_constants(constants, false, check_full_update, user_managed);
  }

 private:
  torch::inductor::AOTIModelPackageLoader loader_;
};
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<Runner>(m, "Runner")
      .def(pybind11::init<const std::string&, int64_t>())
      .def("run", &Runner::run)
      .def("constant_fqns", &Runner::constant_fqns)
      .def("metadata", &Runner::metadata)
      .def("call_spec", &Runner::call_spec)
      .def("load_constants", &Runner::load_constants);
}
"""


@functools.cache
def native_runner() -> Any | None:
    """The extension module (built once per source, torch and Python version), or None where it cannot be built
    (one line on stderr says why)."""
    from torch.utils.cpp_extension import load_inline

    tag = hashlib.sha256(f"{SOURCE}{torch.__version__}{sys.version}".encode()).hexdigest()[:12]
    try:
        return load_inline(f"certseg_aoti_runner_{tag}", cpp_sources=[SOURCE], verbose=False)
    except Exception as error:  # no compiler, missing headers: compiled models then run in one thread
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"certseg: cannot build the GIL-free AOTInductor runner ({first}); compiled models run without "
              "the helper thread", file=sys.stderr)
        return None


class NativeModel:
    """A loaded package, called as torch's ``AOTICompiledModel`` is (inputs and outputs through the package's
    call spec), through ``native_runner``'s runner."""

    def __init__(self, path: str, device_index: int = -1) -> None:
        extension = native_runner()
        if extension is None:
            raise RuntimeError("the GIL-free AOTInductor runner is not available")
        self.runner = extension.Runner(path, device_index)
        from torch.utils import _pytree as pytree

        self.out_spec = pytree.treespec_loads(self.runner.call_spec()[1])  # inputs go in flat, in order

    def __call__(self, *args: Any) -> Any:
        from torch.utils import _pytree as pytree

        flat = pytree.tree_flatten((args, {}))[0]
        outputs = self.runner.run([x for x in flat if isinstance(x, torch.Tensor)])
        return pytree.tree_unflatten(outputs, self.out_spec)

    def get_metadata(self) -> dict[str, str]:
        return dict(self.runner.metadata())

    def get_constant_fqns(self) -> list[str]:
        return list(self.runner.constant_fqns())

    def load_constants(self, constants: dict[str, torch.Tensor], *, check_full_update: bool,
                       user_managed: bool = False) -> None:
        self.runner.load_constants(constants, check_full_update, user_managed)
