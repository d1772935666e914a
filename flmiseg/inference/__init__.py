"""Inference: arrays in; probabilities, masks and instance labels out. No files.

  model.py    flmiseg.load and the Model: a trained model loaded once, and Model.segment
  segment.py  the core: planes -> resizing decisions, tiles, threshold, instances, warnings
  tiling.py   the jitted forward pass (TTA) and Gaussian-blended tiles
  overlay.py  an image with its mask's contour, for people to look at

May import flmiseg.store, data, models, objects and core; never train, evaluation, export or
cli (they build on this).
"""
