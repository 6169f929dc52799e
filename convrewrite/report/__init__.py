"""The report: a data object (``model``, ``log``), shown by views (``views``, found through ``registry``).

Nothing in this package imports torch or the engine: a report read back from JSON renders
anywhere. The engine's ``engine/report_builder.py`` turns a run into a ``Report``.
"""
