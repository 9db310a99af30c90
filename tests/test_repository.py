"""The repository keeps its promises: CI runs the README's test command; every package is installed."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    return re.findall(r"```bash\n(python3\.11 -m venv[^\n]*)\n```", (REPO / "README.md").read_text())


def test_ci_runs_exactly_the_readme_test_command() -> None:
    commands = readme_commands()
    assert len(commands) == 2, commands
    ci_lines = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line.startswith("python3.11")]
    assert ci_lines == [commands[1]]
    assert commands[1].endswith("python -m pytest")


def test_readme_first_command_runs_the_main_job_on_the_shipped_sample() -> None:
    first = readme_commands()[0]
    assert "certseg certify examples/street.png" in first
    assert (REPO / "examples" / "street.png").is_file() and (REPO / "examples" / "street_labels.png").is_file()


def test_every_python_package_folder_is_declared() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = config["package-dir"]
    declared = set(config["packages"])
    for package, folder in mapping.items():
        for init in (REPO / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(REPO / folder)
            name = ".".join([package, *relative.parts])
            assert name in declared, f"{name} ({init.parent}) is missing from pyproject's packages"


def test_a_wheel_carries_every_package_and_the_data_an_installed_certseg_reads(tmp_path: Path) -> None:
    """Outside a source checkout certseg finds its files as package data: the shipped weights and their manifest,
    the Triton templates, and the sample scene the serving benchmark samples around."""
    import shutil
    import subprocess
    import sys
    import zipfile

    from certseg.engine.runtimes.triton_runtime import REPOSITORY_VERSION

    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".venv", ".git", "*.egg-info", "__pycache__", "build",
                                                                 "dist", ".pytest_cache", ".ruff_cache"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    [wheel] = (tmp_path / "dist").glob("certseg-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    for package in config["packages"]:
        assert f"{package.replace('.', '/')}/__init__.py" in names, package
    weights = {f"certseg/engine/weights/{p.name}" for p in (REPO / "engine" / "weights").iterdir()}
    assert weights <= names
    assert {"certseg/examples/street.png", "certseg/examples/street_labels.png",
            f"certseg/model_repository/templates/v{REPOSITORY_VERSION}/python/certseg_step.py",
            f"certseg/model_repository/templates/v{REPOSITORY_VERSION}/python/certseg_chain/model.py"} <= names
    assert not any(name.startswith("certseg/examples/figures") for name in names)  # README figures stay out


def test_the_serving_benchmark_reads_the_sample_as_package_data() -> None:
    from importlib import resources

    from certseg.bench.serving import SAMPLE

    assert SAMPLE == Path(str(resources.files("certseg.examples") / "street.png")) and SAMPLE.is_file()
