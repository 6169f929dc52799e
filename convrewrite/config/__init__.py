"""Configuration, below every command: the settings schema (``schema``), the ``[tool.convrewrite]``
table of pyproject.toml (``project``) and one command's resolved settings (``job``).

Nothing here imports torch, the engine or the gate (one lazy exception, ``job`` reading the named
targets through ``gate.budgets.config_targets``, is listed in ``tests/test_import_floors.py``).
"""
