"""flmiseg: segmentation of intracellular structures in fluorescence microscopy images.

A JAX/Flax reimplementation of "Segmentation of Intracellular Structures in Fluorescence
Microscopy Images by Fusing Low-Level Features" (Guo et al., PRCV 2021).

  import flmiseg
  model = flmiseg.load('nucleus')             # a shipped model (er, mito, nucleus) or a folder
  result = model.segment(image, instances=True)
  result.mask, result.labels, result.prob

`load` and `Model` (flmiseg/inference/model.py) are imported on first use, so `import flmiseg`
stays cheap (no JAX).
"""

__version__ = "0.1.0"
__all__ = ['load', 'Model']


def __getattr__(name: str):
  """flmiseg.load and flmiseg.Model, imported when first asked for."""
  if name in __all__:
    from flmiseg.inference import model  # pylint: disable=g-import-not-at-top
    return getattr(model, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
  return sorted(list(globals()) + __all__)
