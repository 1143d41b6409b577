"""The two-tower's text-input shape, torch-free: the training config (and the Dagster config built from it)
reads these without loading torch."""

TEXT_BUCKETS = 4096  # hashed bag of words over title + tags
TEXT_LEN = 16  # distinct tokens kept per item
