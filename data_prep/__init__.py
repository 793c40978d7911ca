"""Dataset acquisition helpers: synthetic test videos, real sample videos, manifests."""
