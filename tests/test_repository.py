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
