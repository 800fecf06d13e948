"""Plots and summary tables of a job's results, from plain metrics dicts (no model, transport
or job in here: every layer above may use it)."""
