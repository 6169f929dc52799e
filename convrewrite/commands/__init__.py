"""What each command does, called by the command line (``convrewrite.cli``) and the Python API
(``convrewrite.api``) alike: ``run`` (report, and the run behind apply and check), ``apply``
(rewrite, write, distil the written output), ``distill`` (distil an apply output) and ``plan``
(choose a rule and options per layer to meet a budget). A new command is one module here plus
its thin wrapper in ``cli/__init__.py``.
"""
