"""Samplers: one module per family (see DESIGN.md)."""
