"""Presets: the shipped files, --preset FILE.toml, --set FIELD=VALUE, and an error naming the field for each
kind of mistake."""

import tomllib

import pytest
from conftest import FAST, TINY, assert_user_error, leftovers, preset_toml, toml_value

from animate_cli.errors import AnimateError
from animate_cli.preset import CHOICES, FIELDS, RANGES, apply_settings, load_preset, preset_dir, preset_names
from animate_cli.runner import resolve_preset


def test_shipped_presets():
    names = preset_names()
    assert {"fp32", "bf16"} <= set(names)
    for name in names:
        raw = tomllib.loads((preset_dir() / f"{name}.toml").read_text())
        assert set(raw) == set(FIELDS), f"presets/{name}.toml must name every field, and only those"
        preset = load_preset(name)
        assert preset.name == name
    reference = load_preset("fp32")
    assert reference.dtype == "float32" and reference.tf32 is False


def test_presets_and_examples_are_found_in_a_checkout_that_was_not_installed(monkeypatch):
    """PYTHONPATH=checkout: the mapped packages animate_cli.presets and animate_cli.examples do not import; the
    checkout's presets/ and examples/ folders stand in for them."""
    from importlib import resources

    from animate_cli import preset
    from animate_cli.commands.bench import default_image

    installed = {name: resources.files(f"animate_cli.{name}") for name in ("presets", "examples")}
    real = resources.files

    def files(anchor):
        if anchor in ("animate_cli.presets", "animate_cli.examples"):
            raise ModuleNotFoundError(f"No module named {anchor!r}")
        return real(anchor)

    monkeypatch.setattr(resources, "files", files)
    assert preset.preset_names() == ["bf16", "compiled", "distilled", "fp32"]
    assert load_preset("fp32").dtype == "float32"
    image = default_image()
    assert image.is_file() and image.read_bytes() == (installed["examples"] / "coffee.jpg").read_bytes()
    assert (preset.preset_dir() / "bf16.toml").read_text() == (installed["presets"] / "bf16.toml").read_text()


def test_preset_file_without_name_takes_its_stem(tmp_path):
    path = tmp_path / "quick.toml"
    path.write_text(preset_toml("fp32", drop=("name", "description"), steps=4))
    preset = load_preset(str(path))
    assert preset.name == "quick" and preset.description == "" and preset.steps == 4


def test_unknown_preset_name(cli, make_image, tmp_path):
    line = assert_user_error(cli(make_image(), "-o", tmp_path / "o.mp4", *TINY, "--preset", "nosuch"),
                             "unknown preset 'nosuch'")
    for name in preset_names():
        assert name in line  # the choices
    assert leftovers(tmp_path, {"img.png"}) == []


# name -> (preset file text, substrings the error line must hold besides the file's path)
BAD_FILES = {
    "unknown field": (lambda: preset_toml() + "colour = 1\n", ["unknown field 'colour'"]),
    "bad type": (lambda: preset_toml(steps="many"), ["field 'steps'", "int", "'many'"]),
    "bool for int": (lambda: preset_toml(steps=True), ["field 'steps'", "int"]),
    "out of range": (lambda: preset_toml(motion=300), ["field 'motion'", "between 1 and 255", "300"]),
    "bad choice": (lambda: preset_toml(sampler="ddim"), ["field 'sampler'", "euler", "'ddim'"]),
    "bad frames": (lambda: preset_toml(frames="many"), ["field 'frames'"]),
    "missing field": (lambda: preset_toml(drop=("steps",)), ["missing field 'steps'"]),
    "invalid toml": (lambda: preset_toml() + "steps = = 3\n", ["not valid TOML", "line"]),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_preset_file(cli, make_image, tmp_path, case):
    text, needles = BAD_FILES[case]
    path = tmp_path / "broken.toml"
    path.write_text(text())
    out = tmp_path / "out"
    out.mkdir()
    assert_user_error(cli(make_image(), "-o", out / "o.mp4", *TINY, "--preset", path), str(path), *needles)
    assert leftovers(out, set()) == []
    # `animate presets FILE` reports the same.
    assert_user_error(cli("presets", path), str(path), *needles)


def test_missing_preset_file(cli, make_image, tmp_path):
    assert_user_error(cli(make_image(), "-o", tmp_path / "o.mp4", *TINY, "--preset", tmp_path / "none.toml"),
                      "none.toml", "not found")


@pytest.mark.parametrize("setting, needles", [
    ("nosuchfield=1", ["--set", "unknown field 'nosuchfield'"]),
    ("steps=abc", ["--set", "field 'steps'", "'abc'"]),
    ("steps=2.5", ["--set", "field 'steps'"]),
    ("steps=true", ["--set", "field 'steps'"]),
    ("steps", ["--set 'steps'", "FIELD=VALUE"]),
    ("=3", ["FIELD=VALUE"]),
    ("motion=0", ["field 'motion'", "between"]),
    ("sampler=ddim", ["field 'sampler'", "dpmpp_2m"]),
    ("tf32=yes", ["field 'tf32'", "bool"]),
    ("name=other", ["'name'", "cannot be changed"]),
])
def test_bad_set(cli, make_image, tmp_path, setting, needles):
    assert_user_error(cli(make_image(), "-o", tmp_path / "o.mp4", *FAST, "--set", setting), *needles)
    assert leftovers(tmp_path, {"img.png"}) == []


def other_value(preset, field: str):
    """A valid value for `field` that differs from the preset's, worked out from the field's rules so a new
    field is covered without editing this test (unless it has rules this does not know)."""
    current = getattr(preset, field)
    if field in CHOICES:
        return next(c for c in CHOICES[field] if c != current)
    if isinstance(current, bool):
        return not current
    if field == "frames":
        return 3 if current != 3 else 5
    if field == "student":
        return "auto" if current != "auto" else ""
    if field in RANGES:
        low, high = RANGES[field]
        kind = type(FIELDS[field].default)
        candidate = kind(low + 1) if kind is int else (low + high) / 2
        return candidate if candidate != current else kind(low)
    raise AssertionError(f"test_every_field_can_be_set: no test value for field {field!r}; add one")


@pytest.mark.parametrize("base", ["fp32", "bf16"])
def test_every_field_can_be_set(base):
    preset = load_preset(base)
    for field in FIELDS:
        if field in ("name", "description"):
            continue
        value = other_value(preset, field)
        text = value if isinstance(value, str) else toml_value(value)  # sampler=euler: a bare word, as typed
        changed = apply_settings(preset, [f"{field}={text}"])
        assert getattr(changed, field) == value and type(getattr(changed, field)) is type(value), field
        assert {k: v for k, v in changed.as_dict().items() if k != field} == \
               {k: v for k, v in preset.as_dict().items() if k != field}, f"--set {field} changed another field"


def test_set_value_forms():
    preset = load_preset("fp32")
    assert apply_settings(preset, ["max_guidance=2"]).max_guidance == 2.0  # an int where a float goes
    assert type(apply_settings(preset, ["max_guidance=2"]).max_guidance) is float
    assert apply_settings(preset, ['sampler="dpmpp_2m"']).sampler == "dpmpp_2m"  # quoted, as TOML
    assert apply_settings(preset, ["frames=8"]).frames == 8
    assert apply_settings(preset.replace(frames=8), ["frames=auto"]).frames == "auto"
    assert apply_settings(preset, [" steps = 7 "]).steps == 7
    assert apply_settings(preset, ["steps=3", "steps=4"]).steps == 4  # the last one wins
    assert apply_settings(preset, []) is preset


def test_precedence_preset_then_set_then_flags():
    chosen = resolve_preset("fp32", ["steps=5", "fps=9"], steps=2, fps=None, frames=None, motion=None,
                            noise_aug=None, decode_chunk=None)
    assert (chosen.steps, chosen.fps) == (2, 9)
    with pytest.raises(AnimateError, match="--noise-aug"):
        resolve_preset("fp32", [], noise_aug=50.0)
