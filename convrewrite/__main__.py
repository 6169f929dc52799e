"""``python -m convrewrite`` runs the command-line interface."""

from convrewrite.cli import main

main()
