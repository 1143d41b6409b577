"""Kairos: assets."""
