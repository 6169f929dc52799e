"""The engine: the pipeline that runs the stages (profile, trace, rewrite, verify, fit, ...) over one state.

``pipeline`` plans and runs the registered stages over one ``state.RunState``; ``stages/`` holds
one file per stage; ``consumers`` and ``conv_subclasses`` turn the traced graph into the
``ConvSite`` objects rules see. The tools it stands on (loading, tracing, profiling, compare,
threads) live one floor down, in ``convrewrite.core``.
"""
