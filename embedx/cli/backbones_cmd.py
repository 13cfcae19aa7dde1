"""CLI commands (filled in by its owner; see embedx/cli/main.py)."""

COMMANDS: list = []
