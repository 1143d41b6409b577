"""What a served model is and how it is loaded: the bundle, the two-tower architecture, the registry read path.

Training writes these artifacts and serving reads them; both import this package, and it imports neither
(tests/test_layering.py), so serving never depends on training code (only on the exported artifacts).
"""
