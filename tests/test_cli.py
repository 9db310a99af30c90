"""``certseg certify`` end to end on the shipped sample, and its one-line errors."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_io import png_header_only

from certseg.engine.files.images import read_labels
from certseg.engine.models.registry import shipped_models
from certseg.engine.runtimes.process import MALLOC_SETTINGS, malloc_arenas, malloc_environment

from conftest import interrupt_when

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "street.png"
EXAMPLE_LABELS = REPO / "examples" / "street_labels.png"

needs_shipped = pytest.mark.skipif(
    not {"procedural-hrnet-clean", "procedural-adm"} <= set(shipped_models()),
    reason="the shipped default models are not in engine/weights",
)


def certseg(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    return subprocess.run(
        [sys.executable, "-m", "certseg.engine.commands.cli", *args], capture_output=True, text=True, cwd=cwd, env=env,
        timeout=900,
    )


@needs_shipped
def test_readme_first_command_certifies_the_shipped_sample(tmp_path: Path) -> None:
    """The README's first command (plus --out): outputs exist and make sense."""
    result = certseg("certify", str(EXAMPLE), "--labels", str(EXAMPLE_LABELS), "--out", str(tmp_path), "--seed", "1",
                     "--quiet")
    assert result.returncode == 0, result.stderr
    certified = read_labels(tmp_path / "street.certified.png")
    truth = read_labels(EXAMPLE_LABELS)
    assert certified.shape == truth.shape
    report = json.loads((tmp_path / "street.json").read_text())
    num_classes = len(report["classes"])
    assert set(np.unique(certified)) <= set(range(num_classes + 1))
    with Image.open(tmp_path / "street.overlay.png") as overlay:
        assert overlay.size == (truth.shape[1], truth.shape[0]) and overlay.mode == "RGB"
    assert report["method"] == "denoisecertify" and report["seed"] == 1
    assert report["sigma"] == 0.25 and report["n0"] == 10 and report["n"] == 100
    assert report["radius"] == pytest.approx(0.25 * 0.6744897501960817)
    assert report["timestep"]["rule"] == "principled" and report["timestep"]["t"] > 0
    assert report["models"]["denoiser"]["name"] == "procedural-adm"
    assert report["certified_space"]["channels"] == 3
    assert report["non_finite"] == {"policy": "abstain", "selection_samples": 0, "selection_pixel_samples": 0,
                                    "estimation_samples": 0, "estimation_pixel_samples": 0}
    abstained = float(np.mean(certified == num_classes)) * 100
    assert report["abstain_percent"] == pytest.approx(abstained)
    assert sum(report["per_class_certified_pixels"].values()) == certified.size
    # A useful certificate on the sample: most pixels certified, and those mostly correct.
    assert report["abstain_percent"] < 60
    decided = certified != num_classes
    assert np.mean(certified[decided] == truth[decided]) > 0.85
    assert report["metrics"]["certified_accuracy"] == pytest.approx(np.mean(certified == truth))
    present = [c for c in range(num_classes) if (truth == c).any() or (certified == c).any()]
    ious = [((certified == c) & (truth == c)).sum() / ((certified == c) | (truth == c)).sum() for c in present]
    assert report["metrics"]["mean_iou"] == pytest.approx(np.mean(ious))
    assert report["metrics"]["mean_iou_convention"] == "classes present in labels or prediction"
    assert "torch" in report["versions"]
    for name in ("certified", "overlay"):  # the JSON vouches for exactly these maps
        entry = report["outputs"][name]
        assert hashlib.sha256((tmp_path / entry["file"]).read_bytes()).hexdigest() == entry["sha256"]
    assert report["memory"]["needs_bytes"]["host"] > 0
    # --batch auto: the batch the session picked (at most 16 on CPU) is the one recorded, in the settings as before
    assert 1 <= report["settings"]["batch"] <= 16 and report["memory"]["batch"] == report["settings"]["batch"]
    assert report["settings"]["noise_backend"] == "numpy-philox"  # --noise-backend auto on CPU
    assert report["threads"]["requested"] is None and report["threads"]["torch"] >= 1
    # torch's huge pages only where glibc maps large blocks (the user allowed it), unless the user chose
    default_thp = "1" if os.environ.get("MALLOC_MMAP_MAX_", "0") != "0" else None
    assert report["thp_mem_alloc"] is (os.environ.get("THP_MEM_ALLOC_ENABLE", default_thp) == "1")
    assert report["malloc_arena_max"] == int(os.environ.get("MALLOC_ARENA_MAX", "1"))  # one heap unless the user chose
    assert report["malloc_mmap_max"] == int(os.environ.get("MALLOC_MMAP_MAX_", "0"))  # freed memory kept
    assert report["malloc_trim_threshold"] == int(os.environ.get("MALLOC_TRIM_THRESHOLD_", str(2**31 - 1)))


MALLINFO_PROBE = """
import ctypes, json, sys
from certseg.engine.runtimes.process import tune_malloc
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                                               "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype, libc.malloc.restype, libc.free.argtypes = MallInfo2, ctypes.c_void_p, [ctypes.c_void_p]
applied = tune_malloc(json.loads(sys.argv[1]))
before = libc.mallinfo2().hblks
block = libc.malloc(64 << 20)
mmapped = libc.mallinfo2().hblks - before
libc.free(block)
print(json.dumps({"applied": applied, "mmapped": mmapped, "free_kept": libc.mallinfo2().fordblks}))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc")
def test_tune_malloc_keeps_large_blocks_in_the_heap_unless_the_user_chose() -> None:
    """A 64 MiB block (over glibc's mmap threshold) comes from the heap and stays there once freed; glibc's default
    maps it and unmaps it on free; a user's variables win over certseg's values."""
    def probe(users: dict[str, str]) -> dict:
        done = subprocess.run([sys.executable, "-c", MALLINFO_PROBE, json.dumps(users)], capture_output=True,
                              text=True, check=True, env={k: v for k, v in os.environ.items() if "MALLOC" not in k})
        return json.loads(done.stdout)

    tuned = probe({})
    assert tuned["applied"] == {s.variable: s.value for s in MALLOC_SETTINGS}
    assert tuned["mmapped"] == 0 and tuned["free_kept"] >= 64 << 20
    users = probe({s.variable: "1" for s in MALLOC_SETTINGS})
    assert users["applied"] == {} and users["mmapped"] == 1 and users["free_kept"] < 64 << 20


def test_malloc_environment_leaves_a_users_choice_alone() -> None:
    assert malloc_arenas({"MALLOC_ARENA_MAX": "4"}) == 4
    child = malloc_environment({"MALLOC_ARENA_MAX": "4"})
    assert child == {"MALLOC_ARENA_MAX": "4", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}


@needs_shipped
def test_same_seed_same_certificate_and_segcertify_runs(tmp_path: Path) -> None:
    common = ["certify", str(EXAMPLE), "--n0", "4", "--n", "50", "--alpha", "0.1", "--seed", "5", "--quiet"]
    first = certseg(*common, "--out", str(tmp_path / "a"))  # --batch auto
    second = certseg(*common, "--out", str(tmp_path / "b"), "--batch", "7", "--threads", "1")
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    np.testing.assert_array_equal(
        read_labels(tmp_path / "a" / "street.certified.png"), read_labels(tmp_path / "b" / "street.certified.png")
    )
    auto, seven = (json.loads((tmp_path / folder / "street.json").read_text()) for folder in ("a", "b"))
    assert auto["settings"]["batch"] != 7 and seven["settings"]["batch"] == 7
    assert seven["threads"] == {"requested": 1, "torch": 1}
    seg = certseg(*common, "--method", "segcertify", "--out", str(tmp_path / "c"))
    assert seg.returncode == 0, seg.stderr
    report = json.loads((tmp_path / "c" / "street.json").read_text())
    assert report["models"]["denoiser"] is None and report["timestep"] is None
    assert report["models"]["segmenter"]["name"] == "procedural-hrnet-noise025"


@pytest.mark.parametrize(
    "args, message",
    [
        (["certify", "missing.png"], "no such image"),
        (["certify", "{bad}"], "not a readable image"),
        (["certify", "{example}", "--sigma", "0"], "sigma must be"),
        (["certify", "{example}", "--sigma", "-1"], "sigma must be"),
        (["certify", "{example}", "--n", "20"], "need n >="),
        (["certify", "{example}", "--tau", "1.2"], "tau must"),
        (["certify", "{example}", "--alpha", "0"], "alpha must"),
        (["certify", "{example}", "--segmenter", "{bad}"], "checkpoint"),
        (["certify", "{example}", "--denoiser", "no-such-model"], "unknown model"),
        (["certify", "{example}", "--labels", "{bad}"], "not a readable label map"),
        (["certify", "{folder}"], "no image (.png, .jpg, .jpeg) found"),  # an empty folder
        (["certify", "{bomb}"], "14000x14000 = 196,000,000 pixels exceeds the limit of 4,194,304 pixels"),
        (["certify", "{example}", "--max-pixels", "32767"], "256x128 = 32,768 pixels exceeds the limit of 32,767"),
        (["certify", "{example}", "--labels", "{bomb}", "--max-pixels", "100000000"], "bomb.png: 14000x14000"),
        (["certify", "{example}", "--max-pixels", "0"], "--max-pixels must be >= 1"),
        (["certify", "{example}", "--threads", "0"], "--threads must be an integer >= 1, got 0"),
        (["certify", "{example}", "--batch", "0"], "batch must be auto or an integer >= 1, got 0"),
    ],
)
def test_bad_input_is_one_line_and_nonzero_exit(tmp_path: Path, args: list[str], message: str) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    bomb = png_header_only(tmp_path / "bomb.png", 14000, 14000)  # 14000x14000 8-bit gray, in 100 bytes
    (tmp_path / "folder").mkdir()
    filled = [a.format(bad=bad, example=EXAMPLE, bomb=bomb, folder=tmp_path / "folder") for a in args]
    result = certseg(*filled, "--out", str(tmp_path / "out"), "--quiet")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def small_vit_adapter(tmp_path_factory: pytest.TempPathFactory, golden: Path) -> Path:
    """The golden small ViT-Adapter config (crop 96x160) as a self-describing segmenter file."""
    import torch

    from certseg.engine.models.registry import save_model, vit_num_classes
    from certseg.engine.models.vit_adapter import build_vit_adapter

    config = json.loads((golden / "vit_adapter_small.json").read_text())["mmseg_model_cfg"]
    torch.manual_seed(0)
    model = build_vit_adapter(config)
    path = tmp_path_factory.mktemp("vit") / "vit-small.safetensors"
    num_classes = vit_num_classes(config)
    save_model(path, model, {"name": "vit-small", "role": "segmenter", "family": "vit_adapter",
                             "config": {"model_cfg": config, "num_classes": num_classes}})
    return path


@pytest.mark.parametrize("runtime", ["torch", "onnx"])
def test_vit_adapter_segmenter_certifies_images_larger_than_its_crop(
    tmp_path: Path, small_vit_adapter: Path, runtime: str
) -> None:
    """The fixed 96x160 crop is handled by slide inference on the 128x256 sample, on both runtimes."""
    result = certseg("certify", str(EXAMPLE), "--method", "segcertify", "--segmenter", str(small_vit_adapter),
                     "--n0", "2", "--n", "50", "--alpha", "0.1", "--seed", "3", "--runtime", runtime,
                     "--out", str(tmp_path), "--quiet")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "street.json").read_text())
    assert report["models"]["segmenter"]["family"] == "vit_adapter"
    certified = read_labels(tmp_path / "street.certified.png")
    assert certified.shape == (128, 256) and certified.max() <= len(report["classes"])


@needs_shipped
def test_an_out_that_is_a_file_and_labels_out_of_range_are_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("a file")
    result = certseg("certify", str(EXAMPLE), "--out", str(tmp_path / "taken"), "--quiet")
    assert result.returncode != 0 and result.stderr.strip().splitlines() == [
        f"certseg: error: --out {tmp_path / 'taken'} is a file, not a folder"]
    labels = np.zeros((128, 256), dtype=np.uint8)
    labels[3, 3] = 8  # 8 classes: 0..7
    Image.fromarray(labels).save(tmp_path / "labels.png")
    result = certseg("certify", str(EXAMPLE), "--labels", str(tmp_path / "labels.png"), "--out", str(tmp_path / "o"),
                     "--quiet")
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and "label values must be classes 0..7" in lines[0]
    assert not (tmp_path / "o").exists()


@needs_shipped
def test_ctrl_c_mid_run_prints_one_line_and_exits_130(tmp_path: Path) -> None:
    """SIGINT once sampling is about to start (the memory probe has just written its cache file)."""
    cache = tmp_path / "cache"
    env = dict(os.environ, OMP_NUM_THREADS="2", CERTSEG_CACHE_DIR=str(cache))
    process = subprocess.Popen(
        [sys.executable, "-m", "certseg.engine.commands.cli", "certify", str(EXAMPLE), "--method", "segcertify",
         "--n", "20000", "--out", str(tmp_path / "out")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    stderr = interrupt_when(process, lambda: bool(list(cache.glob("memory/*.json"))), wait_s=300)
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "certseg: interrupted" and "Traceback" not in stderr
    assert not (tmp_path / "out").exists()


@needs_shipped
def test_a_grayscale_image_is_certified_in_its_own_space(tmp_path: Path) -> None:
    """A gray PNG keeps one channel: one noise draw per pixel, recorded as the certified space."""
    with Image.open(EXAMPLE) as colour:
        colour.convert("L").crop((0, 0, 128, 64)).save(tmp_path / "gray.png")
    result = certseg("certify", str(tmp_path / "gray.png"), "--method", "segcertify", "--n0", "2", "--n", "64",
                     "--out", str(tmp_path / "out"), "--seed", "4", "--quiet")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "gray.json").read_text())
    assert report["certified_space"]["channels"] == 1 and report["certified_space"]["name"] == "grayscale"
    assert report["image_size"] == [64, 128]
    with Image.open(tmp_path / "out" / "gray.overlay.png") as overlay:
        assert overlay.size == (128, 64) and overlay.mode == "RGB"


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore")])
def test_running_out_of_memory_mid_run_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    error: BaseException) -> None:
    """If the memory estimate is ever wrong, the run still ends in one line, not a traceback."""
    from typer.testing import CliRunner

    import certseg.engine.commands.certify_command as command
    from certseg.engine.commands.cli import app

    def run_out(request):
        raise error

    monkeypatch.setattr(command, "run_certify", run_out)
    result = CliRunner().invoke(app, ["certify", str(EXAMPLE), "--out", str(tmp_path / "o"), "--batch", "8"])
    lines = result.output.strip().splitlines()
    assert result.exit_code != 0 and len(lines) == 1, result.output
    assert "out of memory" in lines[0] and "lower --batch" in lines[0]


@pytest.mark.parametrize("program, args, expected", [
    ("certseg.engine.commands.cli", ["certify", "x.png", "--sigma", "abc"],
     "certseg: error: Invalid value for '--sigma'"),
    ("certseg.engine.cli", ["certify", "x.png", "--no-such-flag"],  # its name before the engine's split
     "certseg: error: No such option: --no-such-flag"),
    ("certseg.bench.cli", ["--sigma", "abc"], "certseg-bench: error: Invalid value for '--sigma'"),
    ("certseg.engine.commands.cli", ["certify", "x.png", "--batch", "many"],
     "certseg: error: Invalid value for '--batch': expected auto or an integer, got 'many'"),
    ("certseg.bench.cli", ["--noise-backend", "philox"],
     "certseg-bench: error: Invalid value for '--noise-backend': expected one of auto, numpy-philox, torch"),
])
def test_usage_errors_are_one_line_too(program: str, args: list[str], expected: str) -> None:
    result = subprocess.run([sys.executable, "-m", program, *args], capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(expected), result.stderr


def test_serve_threads_go_into_the_default_repository_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """``certseg serve --threads N`` renders the default repository with N threads per step instance; a
    --repository keeps its own, so it is refused there in one line, as --max-request-bytes is."""
    from typer.testing import CliRunner

    import certseg.engine.runtimes.serve as serve
    import certseg.export.default_repository as default
    from certseg.engine.commands.cli import app

    asked: list[dict] = []

    def fake_repository(**options):
        asked.append(options)
        raise ValueError("stop here")

    monkeypatch.setattr(default, "default_repository", fake_repository)
    monkeypatch.setattr(serve, "find_tritonserver", lambda *a, **k: type("B", (), {"bundled": True})())
    result = CliRunner().invoke(app, ["serve", "--threads", "2"])
    assert result.exit_code != 0 and "stop here" in result.output and asked == [
        {"max_request_bytes": None, "threads": 2}]
    result = CliRunner().invoke(app, ["serve", "--repository", "somewhere", "--threads", "2"])
    lines = result.output.strip().splitlines()
    assert result.exit_code != 0 and len(lines) == 1 and "a --repository keeps the threads" in lines[0]
    result = CliRunner().invoke(app, ["serve", "--threads", "0"])
    assert result.exit_code != 0 and "--threads must be an integer >= 1" in result.output


@needs_shipped
def test_threads_reach_torch_and_every_onnx_runtime_session(tmp_path: Path) -> None:
    """--threads N: torch's intra-op threads, and the intra-op threads of ONNX Runtime's sessions, both for graphs
    exported from the shipped weights and for a bring-your-own .onnx file (whose cached module has ORT's default)."""
    import torch
    from byo_models import export_segmenter

    from certseg.engine.runtimes.session import Session
    from certseg.engine.runtimes.settings import Settings

    def ort_threads(session: Session) -> int:
        _, runtime = session.runtime_for((64, 128))
        return runtime.pipeline.segmenter.session.get_session_options().intra_op_num_threads

    before = torch.get_num_threads()
    try:
        shipped = Session.open(Settings(method="segcertify", runtime="onnx", batch=4), threads=1)
        assert torch.get_num_threads() == 1 and ort_threads(shipped) == 1
        own = export_segmenter(tmp_path / "own.onnx")
        assert ort_threads(Session.open(Settings(method="segcertify", segmenter=str(own), batch=4), threads=1)) == 1
        default = Session.open(Settings(method="segcertify", segmenter=str(own), batch=4))
        assert ort_threads(default) == 0  # not asked for: ORT's own default
    finally:
        torch.set_num_threads(before)
