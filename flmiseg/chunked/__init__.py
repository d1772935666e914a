"""Chunked prediction: images bigger than memory, read and written block by block, on Dask.

  run.py         segment_zarr: the run, its passes and checks (flmiseg.segment_zarr)
  sources.py     lazy inputs: OME-Zarr (NGFF 0.4, 0.5), zarr arrays, tiled/pyramidal TIFF
  statistics.py  a plane's repair and normalisation statistics, once, from its blocks
  grid.py        the block grid: cores, halos, the whole plane's tiles each block predicts
  blocks.py      one block through the inference core, written with anchor ids
  link.py        instances without seams: linking across halos, relabelling, objects table
  ngff.py        the OME-Zarr outputs: label images, pyramids, metadata
  engine.py      Dask: threads, processes or a dask.distributed scheduler; one progress bar
  job.py         what every task needs (picklable), and the run's records (resuming)

May import flmiseg.inference, store, data, models, objects, configs and core; never cli or
main (the command line builds on this). Needs the zarr extra (`pip install "flmiseg[zarr]"`:
zarr, dask, distributed), imported only when this package is; `import flmiseg` stays without
it.
"""
