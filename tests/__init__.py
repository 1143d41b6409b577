"""Kairos: tests."""
