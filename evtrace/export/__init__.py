"""Exporters: each reads a finished Session (or a saved trace) and renders it."""
