"""`animate bench` on CPU with random:tiny: every figure present, ratios from the medians, a real PNG."""

import json
import sys
from pathlib import Path

import pytest
from conftest import assert_user_error
from PIL import Image

SMALL = ["--model", "random:tiny", "--device", "cpu", "--size", "32x32", "--frames", "2", "--seed", "3"]
STAGE_KEYS = {"median", "min", "max"}


def rows_by_label(report: dict) -> dict:
    return {r["label"]: r for r in report["rows"]}


@pytest.fixture(scope="module")
def preset_bench(tmp_path_factory):
    """One bench run shared by the tests below: fp32 and bf16 (and a preset that does not exist), with the peer."""
    from conftest import run_main

    folder = tmp_path_factory.mktemp("bench")
    result = run_main(["bench", *SMALL, "--steps", "2", "--presets", "fp32,bf16,nosuch", "--repeats", "2",
                       "--warmup", "1", "--peer", "diffusers", "--peer-dtype", "float32",
                       "--json", folder / "b.json", "--plot", folder / "b.png"])
    assert result.exit_code == 0, result.stdout + result.stderr
    return result, json.loads((folder / "b.json").read_text()), folder


def test_json_has_every_figure_per_preset(preset_bench):
    result, report, _ = preset_bench
    assert report["header"]["random_weights"] is True and report["header"]["torch"]
    assert any("CPU figures" in n for n in report["notes"])  # no GPU here, and the report says so
    assert report["complete"] is True and not any(n.startswith("incomplete") for n in report["notes"])
    rows = rows_by_label(report)
    for label in ("fp32", "bf16", "diffusers (float32)"):
        row = rows[label]
        assert row["available"] and row["repeats"] == 2
        assert set(row["total_s"]) == STAGE_KEYS
        for name, stat in row["stages"].items():
            assert set(stat) == STAGE_KEYS and stat["min"] <= stat["median"] <= stat["max"], name
        assert row["unet_passes"] == 2 * 2  # 2 steps, guided: two passes per step
        assert row["cold_start_s"] > 0 and "peak_gib" in row and row["speedup"] > 0
        assert {"psnr_mean_db", "psnr_worst_db", "ssim_mean", "ssim_worst"} <= set(row["drift"])
    assert {"preprocess", "encode", "denoise", "decode", "write"} <= set(rows["fp32"]["stages"])
    assert "pipeline" in rows["diffusers (float32)"]["stages"]
    assert "fp32" in result.stdout and "bf16" in result.stdout  # the table


def test_speedup_is_the_ratio_of_measured_medians(preset_bench):
    rows = rows_by_label(preset_bench[1])
    first = rows["fp32"]["total_s"]["median"]
    for label in ("fp32", "bf16", "diffusers (float32)"):
        assert rows[label]["speedup"] == pytest.approx(first / rows[label]["total_s"]["median"])
    assert rows["fp32"]["speedup"] == pytest.approx(1.0)


def test_drift_against_fp32(preset_bench):
    rows = rows_by_label(preset_bench[1])
    assert rows["fp32"]["drift"]["psnr_worst_db"] == float("inf") and rows["fp32"]["drift"]["ssim_mean"] == 1.0
    bf16 = rows["bf16"]["drift"]
    assert bf16["psnr_worst_db"] < float("inf")  # bfloat16 and another solver move the numbers ...
    # ... while diffusers' pipeline in float32 is the same computation as our fp32 loop, up to rounding
    assert rows["diffusers (float32)"]["drift"]["psnr_worst_db"] > 40


def test_unavailable_preset_is_reported_not_faked(preset_bench):
    result, report, _ = preset_bench
    missing = rows_by_label(report)["nosuch"]
    assert missing["available"] is False and "nosuch" in missing["reason"]
    assert "stages" not in missing
    assert "unavailable" in result.stdout


def test_plot_is_a_png(preset_bench):
    path = preset_bench[2] / "b.png"
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 200 and image.height > 200


def test_ablation_adds_one_switch_at_a_time(cli, tmp_path):
    result = cli("bench", *SMALL, "--presets", "fp32", "--ablation", "--repeats", "1", "--warmup", "0",
                 "--compile-backend", "eager", "--json", tmp_path / "a.json")
    assert result.exit_code == 0, result.stdout + result.stderr
    rows = json.loads((tmp_path / "a.json").read_text())["rows"]
    labels = [r["label"] for r in rows]
    assert labels == ["fp32", "+bf16", "+attention", "+dpm-solver", "+compile", "+distillation"]
    measured = [r for r in rows if r["available"]][:-1]  # the student replaces the UNet: not one switch
    for before, after in zip(measured, measured[1:], strict=False):
        changed = {k for k, v in after["preset"].items() if before["preset"][k] != v} - {"name", "description"}
        assert changed and changed <= {"dtype", "attention", "sampler", "schedule", "steps", "compile"}
    by = rows_by_label({"rows": rows})
    assert by["fp32"]["unet_passes"] == 50 and by["+dpm-solver"]["unet_passes"] == 30
    assert by["+compile"]["compile_s"] is not None  # cold start reported apart from the steady state
    assert "compile" not in by["+compile"]["stages"] and by["+compile"]["repeats"] == 1  # an extra round
    # random weights: an untrained student (the teacher with a zero guidance embedding), one pass per step
    assert by["+distillation"]["unet_passes"] == 8 and by["+distillation"]["unet_calls"] == 8


def test_plot_without_matplotlib_is_one_clear_line(cli, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = cli("bench", *SMALL, "--steps", "1", "--presets", "fp32", "--repeats", "1", "--warmup", "0",
                 "--plot", tmp_path / "p.png")
    assert_user_error(result, "matplotlib", code=2)  # said before any run
    assert not (tmp_path / "p.png").exists()


def test_rows_keep_their_frames_on_the_cpu(tmp_path, monkeypatch):
    """A row's frames are kept for drift against every other row. The peer's come back on the CPU while the
    project's own pipeline leaves them on the GPU: each row must keep what `.cpu()` gave, or drift compares
    tensors on two devices."""
    import torch

    from animate_cli import bench as b
    from animate_cli.media import load_image

    cpu_frames = torch.zeros(2, 32, 32, 3, dtype=torch.uint8)

    class OnAnotherDevice:  # stands in for frames on a GPU: only .cpu() gives a usable tensor
        def cpu(self):
            return cpu_frames

    def generate(*args, sink, **kwargs):
        sink(0, cpu_frames.numpy())  # the frames, chunk by chunk, to the video being written
        return [OnAnotherDevice()]

    monkeypatch.setattr(b, "generate", generate)
    rows = b.plan_rows(["fp32"], False, None, "bfloat16", {"frames": 2, "steps": 1})
    picture = load_image(Path(__file__).parent.parent / "examples" / "shapes.png")
    bench = b.Bench("random:tiny", torch.device("cpu"), picture, 0, "32x32", "crop", rows, tmp_path)
    figures = bench.run(rows[0])
    assert figures["frames"] is cpu_frames
    assert (tmp_path / "row0.mp4").is_file()


def test_json_is_written_after_every_run_so_a_stopped_bench_keeps_its_figures(tmp_path, monkeypatch):
    """Ctrl-C (or a failure) in a later row: the JSON already holds the rows measured before it, marked
    incomplete; a bench that finishes marks it complete."""
    from conftest import run_main

    from animate_cli import bench as b

    real_run = b.Bench.run

    def run(self, row):
        if row.label == "bf16":
            raise KeyboardInterrupt
        return real_run(self, row)

    monkeypatch.setattr(b.Bench, "run", run)
    path = tmp_path / "b.json"
    result = run_main(["bench", *SMALL, "--steps", "1", "--presets", "fp32,bf16", "--repeats", "1",
                       "--warmup", "0", "--json", path])
    assert result.exit_code == 130
    report = json.loads(path.read_text())
    assert report["complete"] is False and any(n.startswith("incomplete") for n in report["notes"])
    rows = rows_by_label(report)
    assert rows["fp32"]["repeats"] == 1 and rows["fp32"]["total_s"]["median"] > 0
    assert "total_s" not in rows["bf16"]
    assert not list(tmp_path.glob(".*partial"))


def test_drift_is_computed_once_per_row_though_the_json_is_rewritten_per_run(tmp_path, monkeypatch):
    from conftest import run_main

    from animate_cli import bench as b

    calls = []
    real = b.drift
    monkeypatch.setattr(b, "drift", lambda *args: calls.append(1) or real(*args))
    result = run_main(["bench", *SMALL, "--steps", "1", "--presets", "fp32,bf16", "--repeats", "2",
                       "--warmup", "0", "--json", tmp_path / "b.json"])
    assert result.exit_code == 0, result.stdout + result.stderr
    assert len(calls) == 2  # fp32 against itself and bf16 against fp32, over 4 runs and 5 writes
    assert json.loads((tmp_path / "b.json").read_text())["rows"][1]["drift"]["psnr_mean_db"] > 0


def test_ssim_matches_the_two_dimensional_gaussian_window_in_float64():
    """The separable float32 blur against the textbook form: an 11x11 Gaussian (sigma 1.5) applied directly,
    in float64, over every full window of each channel."""
    import torch

    from animate_cli.metrics import ssim

    torch.manual_seed(0)
    a = torch.randint(0, 256, (2, 16, 20, 3), dtype=torch.uint8)
    b = (a.int() + torch.randint(-30, 31, a.shape)).clamp(0, 255).to(torch.uint8)
    coords = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-(coords**2) / (2 * 1.5**2))
    w = torch.outer(g, g) / torch.outer(g, g).sum()
    expected = []
    for fa, fb in zip(a.double() / 255, b.double() / 255, strict=True):
        values = []
        for c in range(3):
            for i in range(16 - 10):
                for j in range(20 - 10):
                    x, y = fa[i:i + 11, j:j + 11, c], fb[i:i + 11, j:j + 11, c]
                    mx, my = (w * x).sum(), (w * y).sum()
                    vx, vy = (w * x * x).sum() - mx**2, (w * y * y).sum() - my**2
                    cxy = (w * x * y).sum() - mx * my
                    values.append(((2 * mx * my + 1e-4) * (2 * cxy + 9e-4))
                                  / ((mx**2 + my**2 + 1e-4) * (vx + vy + 9e-4)))
        expected.append(torch.stack(values).mean())
    assert torch.allclose(ssim(a, b), torch.stack(expected), atol=1e-6)
    assert torch.equal(ssim(a, a), torch.ones(2, dtype=torch.float64))
    assert (ssim(a, b) < 1).all()
