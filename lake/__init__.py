"""The offline store: Delta Lake tables behind one adapter."""
