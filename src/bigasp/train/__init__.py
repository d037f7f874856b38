"""Training: data path (prompt synthesis, bucket sampler, loader), objectives, trainer loop.

Kept free of imports so `bigasp --help` and light modules stay fast; import submodules directly.
"""
