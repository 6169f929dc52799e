"""The CI gate: budgets (``budgets``), ``convrewrite check`` (``check``) and its views (``views``).

The ``[tool.convrewrite]`` configuration it reads lives one floor down, in ``convrewrite.config``;
each target runs through ``convrewrite.commands.run``.

Planning a check (reading the config, parsing budgets) never imports torch; only running the
targets does.
"""
