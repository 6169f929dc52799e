"""The engine: load a model, trace it, and run the stages that profile, rewrite and verify it.

``loading`` finds the user's module and its inputs, ``tracing`` builds the torch.fx graph (with
the leaf fallback), ``profiling`` counts shapes, parameters and MACs per module call, and
``pipeline`` runs the stages over one state. Everything here imports torch.
"""
