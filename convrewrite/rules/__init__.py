"""The built-in rule plugins, installed under the import name ``convrewrite.rules``.

One file per rule. Each registers in the entry-point group ``convrewrite.rules`` (see
pyproject.toml), exactly as a third-party rule would.
"""
