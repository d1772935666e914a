"""flmiseg: segmentation of intracellular structures in fluorescence microscopy images.

A JAX/Flax reimplementation of "Segmentation of Intracellular Structures in Fluorescence
Microscopy Images by Fusing Low-Level Features" (Guo et al., PRCV 2021).

  import flmiseg
  model = flmiseg.load('nucleus')             # a shipped model (er, mito, nucleus) or a folder
  result = model.segment(image, instances=True)
  result.mask, result.labels, result.prob
  flmiseg.segment_zarr(model, 'slide.ome.zarr', 'out/', instances=True)   # bigger than memory

`load` and `Model` (flmiseg/inference/model.py) and `segment_zarr` (flmiseg/chunked/run.py:
the zarr extra) are imported on first use, so `import flmiseg` stays cheap (no JAX, no zarr).
`segment_zarr` is a function of the model rather than its method: the chunked machinery builds
on the inference core, which never imports what builds on it.
"""

__version__ = "0.1.0"
__all__ = ['load', 'Model', 'segment_zarr']


def __getattr__(name: str):
  """flmiseg.load, flmiseg.Model and flmiseg.segment_zarr, imported when first asked for."""
  if name == 'segment_zarr':
    from flmiseg.chunked import run  # pylint: disable=g-import-not-at-top
    return run.segment_zarr
  if name in __all__:
    from flmiseg.inference import model  # pylint: disable=g-import-not-at-top
    return getattr(model, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
  return sorted(list(globals()) + __all__)
