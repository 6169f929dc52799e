"""Command bodies of the CLI: each command's work, behind the thin typer wrappers of ``convrewrite.cli``."""
