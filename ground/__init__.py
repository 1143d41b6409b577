"""Kairos ground: typed settings and the client builders every layer above may import; it imports none of them."""
