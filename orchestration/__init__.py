"""Kairos: orchestration."""
