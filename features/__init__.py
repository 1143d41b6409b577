"""One definition per feature: the registry (data) and the functions that compute features.

The Spark batch job, the streaming job, the training-set builder and the ranking
server all import from here, so a feature cannot be computed two ways.
"""
