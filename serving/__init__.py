"""Kairos: serving."""
