"""A user's package whose model module imports its blocks relatively (``from .blocks import ...``)."""
