"""Kairos: training."""
