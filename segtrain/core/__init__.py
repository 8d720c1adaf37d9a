"""The bottom of the stack, below data, models, losses, eval and the loop: numeric precision,
the process group and ranks, checkpoint files, random-number states and JSON files. These
modules import nothing of segtrain but ``segtrain.errors`` and one another."""
