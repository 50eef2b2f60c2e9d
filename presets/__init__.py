"""Preset files, installed as package data (animate_cli.presets)."""
