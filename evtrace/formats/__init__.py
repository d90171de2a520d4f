"""Trace formats: each module writes or reads one kind of file."""
