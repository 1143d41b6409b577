"""Kairos: streaming."""
