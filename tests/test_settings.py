"""One ``Settings``: both CLIs take an option for every field and build the same settings from the same flags; the
records (JSON ``settings``, results headers) read as they did before the enums; old results files still resume."""

from __future__ import annotations

import json
import os
import typing
from dataclasses import fields
from enum import StrEnum
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from certseg.bench import cli as bench_cli
from certseg.bench.config import GRID_AXES, NOT_COMPAT, BenchConfig, compat_defaults
from certseg.bench.results import ResultsFile, ResumeError
from certseg.engine.choices import Fwer, Method, NoiseBackend, RuntimeName, TimestepRule, choice
from certseg.engine.commands import cli as certseg_cli
from certseg.engine.commands.certify_command import CertifyRequest
from certseg.engine.errors import InputError
from certseg.engine.runtimes.settings import Settings, setting_types

from conftest import REPO_ROOT

runner = CliRunner()

OLD_SETTINGS_RECORD = {
    "method": "denoisecertify", "sigma": 0.25, "n0": 10, "n": 100, "alpha": 0.001, "tau": 0.75, "fwer": "holm",
    "scale": 1.0, "t_rule": "principled", "antialias": False, "segmenter": None, "denoiser": None, "runtime": "torch",
    "device": None, "precision": "fp32", "batch": 16, "noise_backend": "numpy-philox", "non_finite": "abstain",
    "seg_mean": None, "seg_std": None, "seg_input_size": None, "classes": None,
}
"""The JSON ``settings`` of a default run as certseg wrote it before ``Settings`` held enums (same keys and order)."""
ADDED_SETTINGS = {"denoise_steps": 1, "compile": False, "fold_batchnorm": True, "factor_head": True}
"""Settings added since, after the old keys, at their defaults (which give the old certificates, but
``fold_batchnorm``'s and ``factor_head``'s: the runs before them did neither)."""

OLD_COMPAT = {
    "seed": 0, "n0": 10, "n": 100, "alpha": 0.001, "tau": 0.75, "fwer": "holm", "segmenter": None, "denoiser": None,
    "runtime": "torch", "precision": "fp32", "batch": 16, "t_rule": "principled", "antialias": False,
    "noise_backend": "numpy-philox", "radius_map": False, "device": "cpu",
    "dataset": {"name": "procedural", "root": None, "generator_version": 3, "scene_size": [32, 64], "resize": None},
}
"""A results header's ``compat`` for a default run, written before it listed every engine setting."""

DATASET = {"name": "procedural", "generator_version": 3, "scene_size": [32, 64]}


def _options(command: Any) -> set[str]:
    return {opt for param in command.params for opt in param.opts}


def test_every_setting_is_an_option_of_certify_and_bench() -> None:
    """Adding a ``Settings`` field without an option on either command (a sample-changing knob one of them lacks)
    fails here."""
    certify = typer.main.get_command(certseg_cli.app).commands["certify"]  # type: ignore[attr-defined]
    bench = typer.main.get_command(bench_cli.app)
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        assert flag in _options(certify), f"certseg certify has no {flag}"
        assert flag in _options(bench), f"certseg-bench has no {flag}"
        assert f.metadata.get("help"), f"Settings.{f.name} has no help for its option"


def _non_default(name: str, default: Any) -> tuple[list[str], Any]:
    """Command-line words giving setting ``name`` a value other than its default, and that value."""
    kind = setting_types()[name]
    enums = [t for t in typing.get_args(kind) or (kind,) if isinstance(t, type) and issubclass(t, StrEnum)]
    flag = "--" + name.replace("_", "-")
    if enums:
        value = [m for m in enums[0] if m != default][-1]
        return [flag, value.value], value
    if kind is bool:
        return [flag], True
    if kind is float:
        return [flag, repr(default * 2)], default * 2
    if kind is int:
        return [flag, str(default + 1)], default + 1
    if kind == int | None:  # auto by default
        return [flag, "7"], 7
    if kind == str | None:
        return [flag, f"my-{name}"], f"my-{name}"
    if kind == tuple[float, float, float] | None:
        return [flag, "0.25", "0.5", "0.75"], (0.25, 0.5, 0.75)
    if kind == tuple[int, int] | None:
        return [flag, "8", "16"], (8, 16)
    raise AssertionError(f"no test value for Settings.{name}: {kind}")


def test_the_same_flags_make_the_same_settings_in_certify_and_bench(monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path: Path) -> None:
    """Every field at a value other than its default, given the same way to both commands: the settings
    ``certseg certify`` runs equal those of the bench's grid cell (so its certificates are the bench's entries)."""
    args, expected = [], {}
    for f in fields(Settings):
        if f.name == "denoise_steps":  # K > 1 needs denoisecertify, and the non-default method is segcertify
            continue
        words, value = _non_default(f.name, f.default)
        args += words
        expected[f.name] = value
    requests: list[CertifyRequest] = []
    configs: list[BenchConfig] = []

    def fake_certify(request: CertifyRequest) -> str:
        requests.append(request)
        return "done"

    def fake_prepare(config: BenchConfig) -> None:
        configs.append(config)
        raise InputError("stop here")

    monkeypatch.setattr("certseg.engine.commands.certify_command.run_certify", fake_certify)
    monkeypatch.setattr("certseg.bench.run.prepare", fake_prepare)
    result = runner.invoke(certseg_cli.app, ["certify", str(tmp_path / "image.png"), *args])
    assert result.exit_code == 0, result.output
    result = runner.invoke(bench_cli.app, [*args, "--out", str(tmp_path / "bench")])
    assert result.exit_code == 2 and "stop here" in result.output
    [request], [config] = requests, configs
    assert request.settings == Settings(**expected)
    [cell] = config.grid()
    assert config.session_settings(cell) == request.settings.resolved()
    steps = ["--method", "denoisecertify", "--sigma", "0.5", "--denoise-steps", "3"]
    assert runner.invoke(certseg_cli.app, ["certify", str(tmp_path / "image.png"), *steps]).exit_code == 0
    assert runner.invoke(bench_cli.app, [*steps, "--out", str(tmp_path / "bench")]).exit_code == 2
    [cell] = configs[1].grid()
    assert requests[1].settings.denoise_steps == cell.denoise_steps == 3
    assert configs[1].session_settings(cell) == requests[1].settings.resolved()


def test_choices_take_plain_strings_and_record_them_unchanged() -> None:
    settings = Settings(method="segcertify", fwer="bonferroni", t_rule="dds-resized", noise_backend="torch",
                        runtime="onnx")
    assert settings.method is Method.segcertify and settings.fwer is Fwer.bonferroni
    assert settings.t_rule is TimestepRule.dds_resized and settings.noise_backend is NoiseBackend.torch
    assert settings == Settings(method=Method.segcertify, fwer=Fwer.bonferroni, t_rule=TimestepRule.dds_resized,
                                noise_backend=NoiseBackend.torch, runtime=RuntimeName.onnx)
    assert settings.fwer == "bonferroni" and {"bonferroni": 1}[settings.fwer] == 1
    record = Settings(device="cpu", batch=16).resolved().record()  # a default CPU run, its batch resolved to 16
    expected = {**OLD_SETTINGS_RECORD, "device": "cpu", **ADDED_SETTINGS}
    assert record == expected and list(record) == [*OLD_SETTINGS_RECORD, *ADDED_SETTINGS]
    assert all(type(v) is str for v in record.values() if isinstance(v, str))
    assert json.dumps(record) == json.dumps(expected)
    with pytest.raises(InputError, match="^fwer must be one of holm, bonferroni, got 'holms'$"):
        Settings(fwer="holms")
    with pytest.raises(ValueError, match="noise backend must be one of numpy-philox, torch"):
        choice(NoiseBackend, "philox", "noise backend")


def test_auto_batch_and_noise_backend_take_auto_and_record_it_as_null_until_resolved() -> None:
    assert Settings().batch is None and Settings(batch="auto") == Settings() and Settings(batch=3).batch == 3
    assert Settings().noise_backend is None and Settings(noise_backend="auto") == Settings()
    assert Settings().record()["batch"] is None and Settings().record()["noise_backend"] is None
    for bad in (0, -1, 2.5, True):
        with pytest.raises(InputError, match="^batch must be auto or an integer >= 1"):
            Settings(batch=bad).validate(64)
    with pytest.raises(InputError, match="^noise_backend must be one of numpy-philox, torch, got 'philox'$"):
        Settings(noise_backend="philox")


def test_auto_noise_backend_is_torch_on_cuda_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CPU and for ONNX Runtime numpy-philox (every pinned certificate unchanged), torch generators on the device
    where torch runs on CUDA; an explicit choice stays; no device named asks torch whether it sees CUDA."""
    import torch

    for cuda, device, runtime, expected in [
        (False, None, None, NoiseBackend.numpy_philox), (False, "cpu", "torch", NoiseBackend.numpy_philox),
        (True, None, None, NoiseBackend.torch), (True, "auto", "torch", NoiseBackend.torch),
        (True, "cpu", None, NoiseBackend.numpy_philox), (True, "cuda:1", None, NoiseBackend.torch),
        (False, "cuda", None, NoiseBackend.torch), (True, None, "onnx", NoiseBackend.numpy_philox),
        (True, "cuda", "onnx", NoiseBackend.numpy_philox),
    ]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        resolved = Settings(device=device, runtime=runtime).resolved()
        assert resolved.noise_backend is expected, (cuda, device, runtime)
        assert resolved.record()["noise_backend"] == expected.value
        assert Settings(device=device, runtime=runtime, noise_backend="numpy-philox").resolved().noise_backend \
            is NoiseBackend.numpy_philox
        assert Settings(device=device, runtime=runtime, noise_backend="torch").resolved().noise_backend \
            is NoiseBackend.torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert BenchConfig(engine=Settings()).engine.noise_backend is NoiseBackend.torch


def test_runtime_is_decided_from_the_models_when_not_named() -> None:
    assert Settings().runtime is None and Settings().resolved().runtime is RuntimeName.torch
    assert Settings(segmenter="mine.onnx").resolved().runtime is RuntimeName.onnx
    assert Settings(segmenter="mine.onnx", runtime="torch").resolved().runtime is RuntimeName.torch
    assert BenchConfig(engine=Settings(denoiser="eps.ONNX")).engine.runtime is RuntimeName.onnx


def test_compat_holds_every_shared_setting() -> None:
    """compat is derived from the fields: a new ``Settings`` field is compared on resume without being listed."""
    config = BenchConfig(engine=Settings(device="cpu"))
    compat = config.compat(DATASET, "cpu")
    assert set(NOT_COMPAT) == {"batch"}  # it changes no numbers: noise is drawn per sample index
    assert set(compat) == ({f.name for f in fields(Settings)} - set(GRID_AXES) - set(NOT_COMPAT)) | {
        "seed", "radius_map", "protocol", "device", "dataset"}
    kept = [k for k in OLD_COMPAT if k not in ("dataset", *NOT_COMPAT)]
    assert {k: compat[k] for k in kept} == {k: OLD_COMPAT[k] for k in kept}
    assert set(OLD_COMPAT) - set(NOT_COMPAT) <= set(compat)
    old_config_keys = {"images", "dataset", "root", "data_seed", "scene_size", "write_data", "resize", "methods",
                       "sigmas", "scales", "n0", "n", "alpha", "tau", "fwer", "segmenter", "denoiser", "runtime",
                       "device", "precision", "batch", "t_rule", "antialias", "noise_backend", "seed", "out",
                       "baseline", "save_labels", "radius_map", "stage_timing", "threads", "max_pixels"}
    assert old_config_keys <= set(config.record())  # the results file's `session` line keeps its keys
    assert config.record()["thp_mem_alloc"] == (os.environ.get("THP_MEM_ALLOC_ENABLE") == "1")


def _header(compat: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "run", "compat": compat}


def test_a_results_file_from_before_the_new_settings_resumes_if_nothing_changed(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    ResultsFile(path).open(_header(OLD_COMPAT))
    defaults = compat_defaults()
    dataset = {**DATASET, "root": None, "resize": None}
    unfolded = {"device": "cpu", "fold_batchnorm": False, "factor_head": False}  # the old runs' models: each
    # rewrite changes last bits
    ResultsFile(path).open(_header(BenchConfig(engine=Settings(**unfolded)).compat(dataset, "cpu")), defaults)
    for batch in (None, 7):  # the file says batch 16: no batch changes an entry, so auto and 7 resume it
        ResultsFile(path).open(_header(BenchConfig(engine=Settings(**unfolded, batch=batch)).compat(dataset, "cpu")),
                               defaults)
    with pytest.raises(ResumeError, match="fold_batchnorm: False in the file, True now"):
        ResultsFile(path).open(_header(BenchConfig(engine=Settings(device="cpu")).compat(dataset, "cpu")), defaults)
    changed = BenchConfig(engine=Settings(device="cpu", non_finite="fail", seg_std=(1.0, 1.0, 1.0)))
    with pytest.raises(ResumeError, match="cannot be resumed") as error:
        ResultsFile(path).open(_header(changed.compat(dataset, "cpu")), defaults)
    assert "non_finite: 'abstain' in the file, 'fail' now" in str(error.value)
    assert "seg_std: None in the file, [1.0, 1.0, 1.0] now" in str(error.value)
    with pytest.raises(ResumeError, match="n: 100 in the file, 50 now"):
        ResultsFile(path).open(_header(BenchConfig(engine=Settings(device="cpu", n=50)).compat(dataset, "cpu")),
                               defaults)


def test_no_arg_type_ignores_left() -> None:
    """Settings and the library carry their enums' types through, so no call needs to silence its argument types."""
    marker = "type: ignore" + "[arg-type]"
    sources = []
    for folder, subfolders, files in os.walk(REPO_ROOT):
        subfolders[:] = [d for d in subfolders if not d.startswith(".") and d not in ("build", "dist", "__pycache__")]
        sources += [Path(folder) / name for name in files if name.endswith(".py")]
    assert len(sources) > 50
    hits = [f"{p.relative_to(REPO_ROOT)}:{n}" for p in sources
            for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if marker in line]
    assert not hits, hits
