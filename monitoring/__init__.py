"""Kairos: monitoring."""
