"""Kairos: data_contracts."""
