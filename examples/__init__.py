"""Example images, installed as package data (animate_cli.examples)."""
