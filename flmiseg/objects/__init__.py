"""Objects as label images (0 background, 1..N one object each), as pure NumPy/SciPy:
instances.py (the instance head's distance targets, seeds and labels from a model's outputs,
connected components, the objects table) and matching.py (objects matched by IoU, instance
AP). May import flmiseg.core only.
"""
