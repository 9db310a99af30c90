"""``compile_model``'s AOTInductor packages: built once per signature and reused from disk by later wrappers (no
export, no compile), another package for anything that changes the compiled code (weights, dtype, layout, shape),
errors of a loaded package raise, and a module ``torch.export`` cannot trace runs through ``torch.compile``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from certseg.engine.runtimes import aot_compile
from certseg.engine.runtimes.aot_compile import AotCompiled, package_path, signature
from certseg.engine.runtimes.torch_runtime import compile_model

pytestmark = pytest.mark.usefixtures("own_package_cache")  # conftest: a fresh folder for the packages


def small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 1))
    net[1].running_mean.uniform_(-0.1, 0.1)
    return net.eval().to(memory_format=torch.channels_last)


def batch(*shape: int, memory_format: torch.memory_format = torch.channels_last) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(1)).contiguous(memory_format=memory_format)


def gone_pid() -> int:
    """The id of a process that has exited."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def count_exports(monkeypatch) -> list[int]:
    import torch.export

    calls: list[int] = []
    export = torch.export.export

    def counted(*args, **kwargs):
        calls.append(1)
        return export(*args, **kwargs)

    monkeypatch.setattr(torch.export, "export", counted)
    return calls


CHILD = """
import os, torch, torch.export
from test_aot_compile import batch, small_net
from certseg.engine.runtimes.torch_runtime import compile_model

torch.set_num_threads(int(os.environ["PARENT_TORCH_THREADS"]))  # packages are per thread count: the parent's

def refuse(*args, **kwargs):
    raise AssertionError("exported again")

torch.export.export = refuse
compiled = compile_model(small_net(), torch.bfloat16)
with torch.inference_mode():
    compiled(batch(2, 3, 8, 16))
assert compiled.runs == 1
print(compiled.packages[0])
"""
"""A fresh process: the same module, shapes and dtype load the package; exporting again would fail it."""


def test_a_second_wrapper_reuses_the_package_without_compiling(monkeypatch, own_package_cache: Path) -> None:
    exports = count_exports(monkeypatch)
    net, x = small_net(), batch(2, 3, 8, 16)
    # A build killed mid-way left its partial file: the next build removes it.
    stale = own_package_cache / "aoti" / f".0123456789abcdef.partial-{gone_pid()}-x.pt2"
    stale.parent.mkdir()
    stale.write_bytes(b"half")
    first = compile_model(net, torch.bfloat16)
    assert isinstance(first, AotCompiled) and first.module is net
    with torch.inference_mode():
        out = first(x)
        again = first(x)  # the loaded runner, not the disk
    assert len(exports) == 1 and first.runs == 2 and len(first.packages) == 1
    assert first.packages[0].parent == own_package_cache / "aoti" and first.packages[0].is_file()
    assert list((own_package_cache / "aoti").iterdir()) == first.packages  # no temporary file left beside it
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        eager = net(x)
    assert out.dtype == eager.dtype == torch.bfloat16 and (out.argmax(1) == eager.argmax(1)).float().mean() >= 0.999
    torch.testing.assert_close(out, again, rtol=0, atol=0)

    twin = small_net()  # another object, the same class, weights and layout: the same package
    second = compile_model(twin, torch.bfloat16)
    with torch.inference_mode():
        torch.testing.assert_close(second(x), out, rtol=0, atol=0)
    assert len(exports) == 1 and second.packages == first.packages

    child = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, PYTHONPATH=str(Path(__file__).parent),
                                    PARENT_TORCH_THREADS=str(torch.get_num_threads())))
    assert child.returncode == 0 and child.stdout.split()[-1] == str(first.packages[0]), child.stdout + child.stderr

    twin.to(memory_format=torch.contiguous_format)  # the runner reads the module's weights: moved ones raise
    with pytest.raises(RuntimeError, match="moved after it was loaded"), torch.inference_mode():
        second(x)

    first.packages[0].write_bytes(b"not a package")  # a broken package raises; nothing falls back to eager
    with pytest.raises(Exception), torch.inference_mode():  # noqa: B017 (torch's loader raises its own kinds)
        compile_model(small_net(), torch.bfloat16)(x)
    assert len(exports) == 1


def test_weights_dtype_layout_shape_and_code_each_name_another_package(monkeypatch) -> None:
    net, x = small_net(), batch(2, 3, 8, 16)
    key = signature((x,))
    base = package_path(net, torch.bfloat16, "cpu", key)
    assert package_path(small_net(), torch.bfloat16, "cpu", key) == base  # the same content: the same package
    changed = small_net()
    with torch.no_grad():
        changed[3].bias[0] += 1e-3
    others = [
        package_path(changed, torch.bfloat16, "cpu", key),
        package_path(net, None, "cpu", key),
        package_path(net, torch.float16, "cpu", key),
        package_path(net, torch.bfloat16, "cpu", signature((x.contiguous(),))),
        package_path(net, torch.bfloat16, "cpu", signature((batch(3, 3, 8, 16),))),
        package_path(net, torch.bfloat16, "cpu", signature((x.double(),))),
        package_path(small_net().to(memory_format=torch.contiguous_format), torch.bfloat16, "cpu", key),
    ]
    with monkeypatch.context() as patch:
        patch.setattr(torch, "get_num_threads", lambda: 64)  # CPU code is generated for a thread count
        others.append(package_path(net, torch.bfloat16, "cpu", key))
    with monkeypatch.context() as patch:
        patch.setattr(aot_compile, "models_source_digest", lambda: "another forward")
        others.append(package_path(net, torch.bfloat16, "cpu", key))
    assert package_path(net, torch.bfloat16, "cpu", key) == base  # (nothing above leaked)
    assert len({base, *others}) == len(others) + 1


class Scaled(nn.Module):
    """A plain attribute in forward: not in the state dict, nor in ``repr``."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


def test_plain_attributes_are_in_the_digest() -> None:
    key = signature((batch(1, 3, 4, 4),))
    assert package_path(Scaled(1.0), None, "cpu", key) != package_path(Scaled(2.0), None, "cpu", key)


def test_another_layout_runs_its_own_package() -> None:
    """fp32, the same shape in two layouts: two packages, each with the eager labels."""
    net = small_net()
    compiled = compile_model(net)
    with torch.inference_mode():
        for memory_format in (torch.channels_last, torch.contiguous_format):
            x = batch(2, 3, 8, 16, memory_format=memory_format)
            out = compiled(x)
            assert (out.argmax(1) == net(x).argmax(1)).float().mean() >= 0.999
    assert len(set(compiled.packages)) == 2 and compiled.runs == 2


class DataDependent(nn.Module):
    """Python control flow on a tensor's value: ``torch.export`` cannot trace it, ``torch.compile`` can."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.conv(x)
        return -self.conv(x)


def test_a_module_export_cannot_trace_runs_through_torch_compile(capsys) -> None:
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    net = DataDependent().eval()
    compiled = compile_model(net)
    graphs = counters["stats"]["unique_graphs"]
    with torch.inference_mode():
        for sign in (1, -1):
            x = sign * batch(1, 3, 4, 8)
            torch.testing.assert_close(compiled(x), net(x))
    assert counters["stats"]["unique_graphs"] > graphs and compiled.runs == 0 and compiled.packages == []
    ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith("certseg:")]
    assert len(ours) == 1 and "DataDependent" in ours[0] and "runs through torch.compile" in ours[0]


def test_timesteps_are_an_argument_of_the_package() -> None:
    """A denoiser's ``(x_t, timesteps)``: the timesteps' values are inputs, not constants of the package."""

    class Denoiser(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            return self.conv(x) * timesteps.float()[:, None, None, None]

    net = Denoiser().eval()
    compiled = compile_model(net)
    x = batch(2, 3, 4, 8)
    with torch.inference_mode():
        for t in (3, 400):
            timesteps = torch.full((2,), t, dtype=torch.int64)
            torch.testing.assert_close(compiled(x, timesteps), net(x, timesteps))
    assert len(compiled.packages) == 1 and compiled.runs == 2


class Shifted(nn.Module):
    """A non-persistent buffer (outside the state dict) and, with ``attribute``, a plain tensor attribute."""

    def __init__(self, attribute: bool) -> None:
        super().__init__()
        self.register_buffer("shift", torch.linspace(-1, 1, 4)[None, :, None, None], persistent=False)
        self.scale = torch.full((1, 4, 1, 1), 3.0) if attribute else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.shift if self.scale is None else x * self.scale + self.shift


@pytest.mark.parametrize("attribute", [False, True])
def test_tensors_outside_the_state_dict_are_read_or_embedded(attribute: bool) -> None:
    """The runner reads a non-persistent buffer from the module; a tensor export names on its own (a plain
    attribute: ``_tensor_constant0``) cannot be pointed at, so that package embeds its weights."""
    from certseg.engine.runtimes.aot_compile import WEIGHTS_EMBEDDED, WEIGHTS_KEY, WEIGHTS_MODULE

    net = Shifted(attribute).eval()
    compiled = compile_model(net)
    x = batch(1, 4, 2, 4, memory_format=torch.contiguous_format)
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x), net(x))
    runner = compiled._runners[next(iter(compiled._runners))]
    assert runner.model.get_metadata()[WEIGHTS_KEY] == (WEIGHTS_EMBEDDED if attribute else WEIGHTS_MODULE)
    assert ("module.shift" in runner.constants) != attribute  # read from the module, or embedded
