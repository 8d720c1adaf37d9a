"""segtrain: config-driven training and evaluation of semantic-segmentation networks."""

__version__ = "0.1.0"
