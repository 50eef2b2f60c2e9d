"""Models shipped with the package, in diffusers layout: `--model NAME` loads animate_cli/weights/NAME offline."""
