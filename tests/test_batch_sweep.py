"""The batch sweep: fresh processes per batch, the same certificate from each, resumable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from certseg.bench import batch_sweep
from certseg.engine.models.registry import shipped_models

needs_shipped = pytest.mark.skipif(
    not {"procedural-hrnet-noise025", "procedural-hrnet-clean", "procedural-adm"} <= set(shipped_models()),
    reason="the shipped default models are not in engine/weights",
)
TINY = ["--size", "24x48", "--method", "denoisecertify", "--repeats", "1", "--n0", "4", "--n", "60", "--threads", "1"]


def sweep(out: Path, *args: str) -> int:
    with pytest.raises(SystemExit) as exit_info:
        batch_sweep.main([*TINY, "--out", str(out), *args])
    return exit_info.value.code


@needs_shipped
def test_two_batches_give_one_certificate_and_a_rerun_resumes(tmp_path: Path, monkeypatch, capsys) -> None:
    out = tmp_path / "sweep.jsonl"
    assert sweep(out, "--batches", "1", "8") == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["batch"] for line in lines] == [1, 8]
    assert lines[0]["digest"] == lines[1]["digest"] and len(lines[0]["digest"]) == 64
    for line in lines:  # measured by the child's own rusage, in a process of its own
        assert line["peak_rss_mib"] > 50 and line["minor_faults"] > 0 and line["user_s"] > 0
        assert 0 < line["model_s"] <= line["certify_s"] < line["process_s"]
    assert "one certificate for every batch" in capsys.readouterr().out

    def no_run(spec):
        raise AssertionError(f"finished run {spec} was run again")

    monkeypatch.setattr(batch_sweep, "run_child", no_run)
    assert sweep(out, "--batches", "1", "8") == 0
    assert out.read_text().count("\n") == 2


def test_differing_certificates_fail_the_sweep(tmp_path: Path, capsys) -> None:
    out = tmp_path / "sweep.jsonl"
    base = {"kind": "batch_sweep", "size": "24x48", "method": "denoisecertify", "runtime": "torch", "repeat": 0,
            "threads": 1, "n0": 4, "n": 60, "seed": 21, "sigma": 0.25, "certify_s": 1.0, "model_s": 0.9,
            "overhead": 1.1, "user_s": 1.0, "system_s": 0.1, "minor_faults": 10, "peak_rss_mib": 300.0}
    out.write_text("".join(json.dumps({**base, "batch": batch, "digest": digest}) + "\n"
                           for batch, digest in ((1, "a" * 64), (8, "b" * 64))))
    assert sweep(out, "--batches", "1", "8") == 1
    assert "certificates differ across batches" in capsys.readouterr().out


def test_bad_sizes_and_batches_fail_in_one_line(tmp_path: Path, capsys) -> None:
    assert sweep(tmp_path / "x.jsonl", "--size", "24x", "--batches", "1") == 1
    assert sweep(tmp_path / "x.jsonl", "--batches", "0") == 1
    assert sweep(tmp_path / "x.jsonl", "--batches", "1", "--env", "NO_VALUE") == 1
    assert not (tmp_path / "x.jsonl").exists()


def test_extra_environment_is_part_of_a_runs_name() -> None:
    assert batch_sweep.parse_env("A=1 GLIBC_TUNABLES=glibc.malloc.hugetlb=1") == {
        "A": "1", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    spec = {"size": "8x8", "batch": 1, "env": "A=1"}
    assert batch_sweep.run_key(spec) != batch_sweep.run_key({**spec, "env": ""})
    assert batch_sweep.run_key({"size": "8x8", "batch": 1}) == batch_sweep.run_key({**spec, "env": ""})


def test_batches_take_space_separated_values() -> None:
    assert batch_sweep.expand_batches(["--batches", "1", "4", "--size", "8x8", "--batches", "16"]) == [
        "--batches", "1", "--batches", "4", "--size", "8x8", "--batches", "16"]
