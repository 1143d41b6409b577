"""Compliance: model lineage reports, the right to be forgotten, and the privacy audit log."""
