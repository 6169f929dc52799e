"""Raises at import with terminal colour codes in the message, as some libraries format errors."""

raise RuntimeError("\x1b[1;31mCUDA driver not found\x1b[0m (set \x1b[33mDEVICE\x1b[0m)")
