"""Continual learning: elastic weight consolidation and experience replay."""
