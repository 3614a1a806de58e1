"""Integrations with training stacks: :mod:`~dataorder.integrations.transformers` (HF ``Trainer``)
and :mod:`~dataorder.integrations.lightning` (Lightning ``Trainer``).

Each module imports its framework when it is imported, and says which package to install
if it is missing; ``import dataorder`` never imports them. What both share (the checkpoint
file and how a saved state is resumed under a trainer that re-draws the trained batches)
lives in :mod:`dataorder.integrations._checkpoint`.
"""
