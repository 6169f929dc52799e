"""The core tools every floor above uses: load a model, trace it, profile it, compare outputs.

``loading`` finds the user's module and its inputs, ``tracing`` builds the torch.fx graph (with
the leaf fallback), ``profiling`` counts shapes, parameters and MACs per module call, ``compare``
compares outputs, ``threads`` sets torch's thread count for a block of work, and ``modules``
holds small module helpers. Nothing here imports the pipeline (``convrewrite.engine``), the
rules' pipeline glue, or any floor above; everything here imports torch.
"""
