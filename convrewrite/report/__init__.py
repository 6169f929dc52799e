"""The report: a data object (``model``), built from an engine run (``builder``), shown by views.

``model`` and ``views`` never import torch: a report read back from JSON renders anywhere.
"""
