"""The CI gate: ``[tool.convrewrite]`` configuration, budgets, and ``convrewrite check``.

Planning a check (reading the config, parsing budgets) never imports torch; only running the
targets does.
"""
