"""Event sources: the simulator, importers, and the event/catalog schemas they share."""
