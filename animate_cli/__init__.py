"""animate: turn still images into short videos on a local GPU, fast."""

__version__ = "0.1.0"
