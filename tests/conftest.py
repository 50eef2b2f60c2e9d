"""Shared fixtures: offline Hugging Face setup, image factory, and ways to run the CLI (in process and as a
subprocess). Every CLI run in the tests uses random:tiny at 64x32, 4 frames and 2-3 steps (CPU)."""

import atexit
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Set before anything imports huggingface_hub, which reads these once at import time.
_HF_HOME = tempfile.mkdtemp(prefix="animate-tests-hf-")
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)
# One CPU thread per process: the machine's cores are shared, and torch's OpenMP threads spinning against other
# processes make a tiny run 30x slower (0.5 s -> 17 s per CLI run measured); results do not depend on it.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_HOME": _HF_HOME, "HF_HUB_DISABLE_TELEMETRY": "1",
               "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
os.environ.update(OFFLINE_ENV)
for _name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "ANIMATE_DEBUG"):
    os.environ.pop(_name, None)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from PIL import Image  # noqa: E402

torch.set_num_threads(1)

TINY = ["--model", "random:tiny", "--device", "cpu"]  # 64x32, 4 frames natively
FAST = [*TINY, "--preset", "fp32", "--steps", "2"]  # a later --preset or --steps wins
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _isolated(monkeypatch):
    """Offline, a private HF cache, no debug tracebacks, and `out.quiet` reset (it is module state)."""
    for key, value in OFFLINE_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("ANIMATE_DEBUG", raising=False)
    from animate_cli.console import out

    monkeypatch.setattr(out, "quiet", False)


@dataclass
class Result:
    exit_code: int
    stdout: str
    stderr: str
    exception: BaseException | None = None  # an exception that escaped main() (ANIMATE_DEBUG=1)

    @property
    def stderr_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]

    @property
    def text(self) -> str:
        """stdout and stderr with whitespace collapsed (rich wraps long lines at 80 columns)."""
        return " ".join((self.stdout + "\n" + self.stderr).split())


def gradient(size: tuple[int, int]) -> np.ndarray:
    """An RGB uint8 [H, W, 3] picture with structure in both directions (not flat, not symmetric)."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    r = x * 255 // max(w - 1, 1)
    g = y * 255 // max(h - 1, 1)
    b = (x * 7 + y * 13) % 256
    return np.stack([r, g, b], axis=-1).astype(np.uint8)


@pytest.fixture
def make_image(tmp_path):
    """make_image(name, size=(W, H), mode='RGB', **save_kwargs) -> path of a JPEG/PNG/... of that size and mode.
    The format follows the suffix; the picture is a gradient, converted to `mode`."""

    def make(name: str = "img.png", size: tuple[int, int] = (64, 32), mode: str = "RGB", **save_kwargs) -> Path:
        path = tmp_path / name
        image = Image.fromarray(gradient(size), "RGB")
        if mode != "RGB":
            image = image.convert(mode)
        image.save(path, **save_kwargs)
        return path

    return make


def run_main(args: list[str], env: dict[str, str] | None = None) -> Result:
    """`animate ARGS` in this process, through `animate_cli.cli.main()` (the console script's entry point), with
    stdout and stderr captured separately by click's CliRunner isolation. SystemExit gives the exit code."""
    from animate_cli.cli import main

    runner = CliRunner()
    exception = None
    old_argv = sys.argv
    with runner.isolation(env=env) as (stdout, stderr, _):
        sys.argv = ["animate", *map(str, args)]
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except Exception as e:  # only with ANIMATE_DEBUG=1 should anything escape main()
            exception, code = e, 1
        finally:
            sys.argv = old_argv
            sys.stdout.flush()
            sys.stderr.flush()
        out_text, err_text = stdout.getvalue().decode(), stderr.getvalue().decode()
    return Result(code, out_text, err_text, exception)


@pytest.fixture
def cli():
    """cli(*args, env=None) -> Result: the command line as a user types it, run in process."""

    def invoke(*args, env: dict[str, str] | None = None) -> Result:
        return run_main(list(args), env)

    return invoke


def subprocess_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, **OFFLINE_ENV, "PYTHONPATH": str(REPO)}
    env.pop("ANIMATE_DEBUG", None)
    env.update(extra or {})
    return env


def console_script() -> str:
    """The installed `animate` script beside this interpreter (else the one on PATH)."""
    script = Path(sysconfig.get_path("scripts")) / "animate"
    if script.is_file():
        return str(script)
    found = shutil.which("animate")
    if found is None:
        pytest.skip("the animate console script is not installed (pip install -e .)")
    return found


def run_subprocess(command: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> Result:
    proc = subprocess.run([*map(str, command)], capture_output=True, text=True, env=subprocess_env(env),
                          cwd=cwd, timeout=300)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def assert_user_error(result: Result, *needles: str, code: int = 2, after_start: bool = False) -> str:
    """A user error: exit `code`, one stderr line 'error: ...' holding every needle, no traceback.
    Errors found before the run starts leave that line alone on stderr; with after_start (an error once the
    model is loaded) the run's own notes (the random-weights warning, the 'IMG -> OUT' line) may precede it."""
    assert result.exception is None, f"exception escaped main(): {result.exception!r}"
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr_lines
    error_lines = [line for line in lines if line.startswith("error:")]
    assert len(error_lines) == 1, result.stderr
    if after_start:
        assert lines[-1] == error_lines[0], result.stderr
    else:
        assert lines == error_lines, result.stderr
    line = error_lines[0]
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


def preset_toml(base: str = "fp32", drop: tuple[str, ...] = (), **changes) -> str:
    """A preset file naming every current field (taken from a shipped preset), with `changes` applied."""
    from animate_cli.preset import load_preset

    data = {**load_preset(base).as_dict(), **changes}
    return "".join(f"{key} = {toml_value(value)}\n" for key, value in data.items() if key not in drop)


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def assert_frames_close(ours, theirs, max_fraction: float = 0.01) -> None:
    """uint8 frames equal up to rounding: at most 1 (of 255) apart, and only in a few values. Float32 results that
    agree to float32 rounding can still land on either side of a .5 boundary when scaled to 0..255 and rounded."""
    ours, theirs = np.asarray(ours).astype(int), np.asarray(theirs).astype(int)
    assert ours.shape == theirs.shape
    diff = np.abs(ours - theirs)
    assert diff.max() <= 1, f"max difference {diff.max()} of 255"
    assert (diff > 0).mean() <= max_fraction, f"{(diff > 0).mean():.2%} of values differ"


def leftovers(folder: Path, expected: set[str]) -> list[str]:
    """Entries in `folder` (hidden ones included: '.NAME.partial*') beyond `expected`."""
    return sorted(p.name for p in folder.iterdir() if p.name not in expected)
