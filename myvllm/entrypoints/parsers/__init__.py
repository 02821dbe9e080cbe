"""Parsers of model output for the chat API: reasoning (`--reasoning-parser`)."""
