"""segtrain's configs, installed as ``segtrain/conf`` (the link segtrain/conf -> ../conf).

Hydra reads a config package only where it has an ``__init__.py``; not a package of its own.
"""
