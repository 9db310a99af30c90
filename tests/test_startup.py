"""What a command imports before it works: ``--help`` imports no heavy library, ``certseg certify`` no
``scipy.stats`` (its exact tails come bit-identical from ``scipy.special``), ``certseg certify --server`` no torch
(the servers draw the noise and run the models; importing torch alone takes 1.3-1.7 s), and the entry points turn
torch's huge-page allocator on unless the user chose. Behaviour (``sys.modules`` in a fresh process), not timings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
from PIL import Image

from certseg.engine.core import tails
from certseg.engine.models.registry import shipped_models

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
HEAVY = ("torch", "scipy", "onnxruntime", "onnx", "tritonclient", "matplotlib", "cv2")
"""Libraries a command imports only when it works (each costs 0.1-1.5 s to import)."""

RUN = """
import importlib, json, os, sys
target, *args = sys.argv[1:]
module, _, function = target.partition(":")
sys.argv = [module, *args]
try:
    getattr(importlib.import_module(module), function)()
except SystemExit:
    pass
print("STARTUP " + json.dumps({"modules": sorted(sys.modules), "thp": os.environ.get("THP_MEM_ALLOC_ENABLE")}))
"""
"""Runs a console script's function as its script would, then prints what it imported."""


def run_script(program: str, *args: str, env: dict[str, str] | None = None) -> dict:
    environ = dict(os.environ if env is None else env, OMP_NUM_THREADS="2")
    done = subprocess.run([sys.executable, "-c", RUN, SCRIPTS[program], *args], capture_output=True, text=True,
                          env=environ, timeout=600)
    line = next((x for x in done.stdout.splitlines() if x.startswith("STARTUP ")), None)
    assert line is not None, done.stdout + done.stderr
    return json.loads(line.removeprefix("STARTUP "))


def heavy(modules: list[str]) -> list[str]:
    return sorted({name.split(".")[0] for name in modules} & set(HEAVY))


def imported_by(*modules: str) -> list[str]:
    """``sys.modules`` of a fresh process after importing ``modules``."""
    code = "import importlib, json, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n" \
           "print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code, *modules], capture_output=True, text=True, timeout=600,
                          check=True)
    return json.loads(done.stdout.splitlines()[-1])


def tiny_image(folder: Path) -> Path:
    """A 32x64 RGB PNG: enough pixels to certify, few enough to stay quick."""
    image = folder / "tiny.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 64, 3), dtype=np.uint8)).save(image)
    return image


@pytest.mark.parametrize("program, args", [
    ("certseg", ["--help"]), ("certseg", ["certify", "--help"]), ("certseg", ["serve", "--help"]),
    ("certseg-bench", ["--help"]), ("certseg-export", ["--help"]),
])
def test_help_imports_no_heavy_library(program: str, args: list[str]) -> None:
    assert program in SCRIPTS
    assert heavy(run_script(program, *args)["modules"]) == []


@pytest.mark.skipif("procedural-hrnet-noise025" not in shipped_models(), reason="needs the shipped segmenter")
def test_certify_imports_scipy_special_not_scipy_stats(tmp_path: Path) -> None:
    image = tiny_image(tmp_path)
    seen = run_script("certseg", "certify", str(image), "--method", "segcertify", "--seed", "0", "--quiet",
                      "--out", str(tmp_path / "out"))
    report = json.loads((tmp_path / "out" / "tiny.json").read_text())  # it did certify
    assert report["n"] == 100 and "scipy.special" in seen["modules"]
    assert "scipy.stats" not in seen["modules"] and "cv2" not in seen["modules"]


def test_a_session_on_servers_and_the_triton_client_import_no_torch() -> None:
    """Only ``Session.open`` (models in this process) needs torch; the modules a server's client runs do not."""
    modules = imported_by("certseg.engine.runtimes.session", "certseg.engine.runtimes.triton_runtime",
                          "certseg.engine.commands.certify_command")
    assert "torch" not in modules and "scipy.stats" not in modules


@pytest.mark.skipif(not {"procedural-hrnet-clean", "procedural-hrnet-noise025", "procedural-adm"}
                    <= set(shipped_models()), reason="the default repository needs the shipped models")
def test_certify_against_a_server_never_imports_torch(default_server, tmp_path: Path) -> None:
    """The served path end to end: connect, certify, write the outputs, all without torch."""
    seen = run_script("certseg", "certify", str(tiny_image(tmp_path)), "--server", default_server.grpc_address,
                      "--method", "segcertify", "--n0", "10", "--n", "100", "--seed", "0", "--quiet",
                      "--out", str(tmp_path / "out"))
    report = json.loads((tmp_path / "out" / "tiny.json").read_text())  # it did certify, on the server
    assert report["n"] == 100 and report["device"] == f"triton:{default_server.grpc_address}"
    assert "tritonclient.grpc" in seen["modules"] and "torch" not in seen["modules"]
    assert report["threads"] == {"requested": None, "torch": None}


@pytest.mark.skipif(not {"procedural-hrnet-clean", "procedural-hrnet-noise025", "procedural-adm"}
                    <= set(shipped_models()), reason="the default repository needs the shipped models")
def test_denoisecertify_against_a_server_imports_torch_only_to_measure_a_new_image_size(
    default_server, tmp_path: Path
) -> None:
    """t* needs the resize's noise factor, measured with torch's resize once per image size, then read back."""
    env = dict(os.environ, CERTSEG_CACHE_DIR=str(tmp_path / "cache"))
    image = tiny_image(tmp_path)
    runs = []
    for out in ("first", "second"):
        seen = run_script("certseg", "certify", str(image), "--server", default_server.grpc_address,
                          "--method", "denoisecertify", "--n0", "4", "--n", "60", "--seed", "0", "--quiet",
                          "--out", str(tmp_path / out), env=env)
        runs.append(("torch" in seen["modules"], json.loads((tmp_path / out / "tiny.json").read_text())))
    assert [imported for imported, _ in runs] == [True, False]
    first, second = (report for _, report in runs)
    assert first["timestep"] == second["timestep"] and first["pipeline"] == second["pipeline"]


@pytest.mark.parametrize("given, mmap_max, expected, expected_export", [
    # certseg keeps large blocks in glibc's heap: no huge-page alignment; export leaves glibc mapping them: on
    (None, None, None, "1"),
    (None, "65536", "1", "1"),  # the user lets glibc map them: huge pages on
    (None, "0", None, None),  # the user keeps them in the heap, export included
    ("0", "65536", "0", "0"), ("1", None, "1", "1"),  # the user's choice wins either way
])
def test_entry_points_turn_huge_pages_on_where_glibc_maps_large_blocks_unless_the_user_chose(
        given: str | None, mmap_max: str | None, expected: str | None, expected_export: str | None) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("THP_MEM_ALLOC_ENABLE", "MALLOC_MMAP_MAX_")}
    for name, value in (("THP_MEM_ALLOC_ENABLE", given), ("MALLOC_MMAP_MAX_", mmap_max)):
        if value is not None:
            env[name] = value
    for program in SCRIPTS:
        want = expected_export if program == "certseg-export" else expected
        assert run_script(program, "--help", env=env)["thp"] == want, program


def test_tails_equal_scipy_stats_bit_for_bit() -> None:
    """The p-value table and the radius use ``tails``' binom.sf and norm.ppf: byte-identical to scipy.stats' over
    every k (and k = -1, n, outside the support) for many n and τ, and over the whole range of Φ⁻¹."""
    for n in [*range(1, 300), 1000, 4096, 100_000]:
        k = np.arange(-1, n + 2)
        for p in (0.5, 0.6, 0.75, 0.9, 0.99, 0.999, 0.001, 0.0, 1.0):
            assert tails.binom.sf(k, n, p).tobytes() == scipy.stats.binom.sf(k, n, p).tobytes(), (n, p)
        assert tails.binom.sf(n - 1, n, 0.75) == scipy.stats.binom.sf(n - 1, n, 0.75)
    assert np.isnan(tails.binom.sf(3, 10, 1.5)) and np.isnan(tails.binom.sf(3, 2.5, 0.5))
    q = np.concatenate([np.linspace(0, 1, 200_001), [-1.0, 2.0, np.nan, 1e-300, 1 - 1e-16]])
    assert tails.norm.ppf(q).tobytes() == scipy.stats.norm.ppf(q).tobytes()
    for tau in (0.5, 0.75, 0.9, 0.999):
        assert tails.norm.ppf(tau) == scipy.stats.norm.ppf(tau) and isinstance(tails.norm.ppf(tau), np.floating)


def test_beta_quantile_equals_scipy_stats_bit_for_bit() -> None:
    """The radius map's Clopper–Pearson bound uses ``tails``' beta.ppf: byte-identical to scipy.stats' for every
    k = 1..n and levels down to α/N of a 2-Mpx image, and at the edges (q = 0, 1, outside [0, 1], a or b ≤ 0)."""
    for n in [*range(1, 300), 1000, 4096, 100_000]:
        k = np.arange(1, n + 1)
        for q in (0.05, 1e-3, 0.001 / 2_097_152, 1e-12, 0.5, 0.0, 1.0):
            assert tails.beta.ppf(q, k, n - k + 1).tobytes() == scipy.stats.beta.ppf(q, k, n - k + 1).tobytes(), (n, q)
    q = np.array([-0.1, 0.0, 0.3, 1.0, 1.1, np.nan])
    assert tails.beta.ppf(q, 2.0, 3.0).tobytes() == scipy.stats.beta.ppf(q, 2.0, 3.0).tobytes()
    edges = (0.3, [0.0, -1.0, 2.0, 2.0], [1.0, 1.0, 0.0, 5.0])
    assert tails.beta.ppf(*edges).tobytes() == scipy.stats.beta.ppf(*edges).tobytes()
    assert isinstance(tails.beta.ppf(0.3, 2, 3), np.floating)
