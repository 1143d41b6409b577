"""Kairos: orchestration (the one Definitions, jobs, sensors, resources, the CLI)."""
