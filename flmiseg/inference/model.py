"""Segmentation of images held in memory: the Python API behind the napari widget.

  from flmiseg.inference import model
  segmenter = model.load('nucleus')     # a shipped model (er, mito, nucleus) or a folder
  result = segmenter(image)               # a (H, W) array of any dtype
  result.mask                             # uint8 0/1, (H, W)
  segmenter(stack, axes='CZYX', channel=1, threshold=0.4, tta=True, instances=True).labels

It runs the code of `--mode=predict` (flmiseg/cli/predict.py): the model is loaded, its
threshold resolved (the one given, else calibrated, else config.eval.threshold) and its
instance settings filled in by the same functions, and each plane goes through
`predict.segment_planes` (normalisation of the whole plane, blended tiles, optional TTA, the
threshold, instances.from_outputs). So the mask of an array equals the `_mask.tif` that
predict writes for a file of the same pixels and options, bit for bit.

A Segmenter keeps the loaded weights and its compiled forward passes (one per TTA, tile and
overlap setting), so calling it again costs only the computation. Calls may come from any
thread (the napari widget calls from a worker thread); they run one at a time.
"""

import dataclasses
import pathlib
import threading
from typing import Callable

import jax
import numpy as np

from flmiseg.train import config_checks
from flmiseg.inference import tiling
from flmiseg.cli import predict
from flmiseg.store import pretrained
from flmiseg.core import registry
from flmiseg.store import rundir
from flmiseg.core import sharding
from flmiseg.data import imagefile
from flmiseg.data import preprocess
from flmiseg.core.errors import UserError

# An array's last axis is taken for its channels (YXC) when it is at most this long and
# shorter than Y and X (`default_axes`).
MAX_LAST_CHANNELS = 8


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: arrays have no truth value.
class Segmentation:
  """What a Segmenter returns for one image; arrays have the image's shape without its
  channel (or RGB) axis, in the order of `axes`.

  Attributes:
    mask: uint8, 1 foreground, 0 background.
    prob: float32 foreground probability.
    labels: uint16 instance labels 1..n per plane (0 background), with instances=True;
      else None.
    axes: the axes of the arrays, letters from 'TZYX'.
    threshold: the probability threshold of the mask.
    threshold_source: 'threshold' (given), 'calibrated' or 'config.eval.threshold'.
    warnings: lines predict would log: an image unlike the training images, a mask that is
      empty or covers nearly everything, a resize to the model's pixel size, merged
      instances of a model without an instance head.
  """
  mask: np.ndarray
  prob: np.ndarray
  labels: np.ndarray | None
  axes: str
  threshold: float
  threshold_source: str
  warnings: tuple[str, ...] = ()


def default_axes(shape: tuple[int, ...], channel: int | None, rgb: bool = False) -> str:
  """The axes assumed for an array of `shape` whose axes are not given.

  Y and X are the last two axes (before an RGB(A) or short channel axis), and the axes before
  them planes (Z, then T before Z), predicted one by one. With a channel chosen, the channel
  axis is the last when it is short (at most MAX_LAST_CHANNELS, shorter than Y and X: YXC),
  else the first (CYX, CZYX). `rgb`: the last axis holds RGB(A) samples (napari's RGB
  layers), made one plane ('S', imagefile's rule), or one of them segmented when a channel
  is chosen ('C').
  Raises UserError when more than two plane axes would remain.
  """
  ndim = len(shape)
  last = ''
  if rgb:
    last = 'S' if channel is None else 'C'
  elif channel is not None and ndim >= 3 and shape[-1] <= MAX_LAST_CHANNELS and (
      shape[-1] < min(shape[-3], shape[-2])):
    last = 'C'
  first = 'C' if channel is not None and not last and ndim > 2 else ''
  planes = ndim - 2 - len(last) - len(first)
  if not 0 <= planes <= 2:
    raise UserError(f'cannot guess the axes of an array of shape {tuple(shape)}'
                    f'{" with a channel" if channel is not None else ""}: give them (letters '
                    'from T, Z, C, Y, X, one per dimension)')
  return first + 'TZ'[2 - planes:] + 'YX' + last


class Segmenter:
  """A trained model, loaded once, that segments arrays (see the module docstring)."""

  def __init__(self, folder, trust_imports: bool = False):
    """Loads the run or packed model in `folder` (its best checkpoint), as --mode=predict
    does: a run whose config names code to import needs trust_imports=True."""
    self.folder = rundir.check_trained(folder)
    self.config = rundir.read_config(self.folder)
    registry.import_modules(rundir.imports_to_run(self.folder, self.config, None,
                                                  trust_imports))
    config_checks.validate(self.config)
    self.mesh = sharding.make_mesh(jax.local_devices())
    self.state, self.step = tiling.load(self.config, self.folder, self.mesh)
    self.training = rundir.read_input_stats(self.folder)
    self._predictors = {}
    self._lock = threading.Lock()

  @property
  def has_instance_head(self) -> bool:
    """Whether instances split touching objects (else they are connected components)."""
    return bool(self.config.model.get('instance_head'))

  def threshold(self, threshold: float | None = None) -> tuple[float, str]:
    """(threshold, where it came from) of a call given `threshold` (None: the model's)."""
    return predict.resolve_threshold(self.config, self.folder, self.step,
                                     predict.Options(input='', output='', threshold=threshold))

  def __call__(self, image: np.ndarray, axes: str | None = None, channel: int | None = None,
               threshold: float | None = None, tta: bool = False, instances: bool = False,
               min_size: int | None = None, pixel_size: float | None = None,
               diameter: float | None = None, tile: int = 0, overlap: float = 0.25,
               name: str = 'image',
               progress: Callable[[float], None] | None = None) -> Segmentation:
    """Segments one image.

    Args:
      image: the pixels, any dtype (8/16-bit, float), 2-D or more.
      axes: one letter per dimension from 'TZCYX' ('S': RGB(A) samples, made one plane),
        e.g. 'YX', 'CYX', 'YXC', 'ZYX'; None or '': `default_axes`.
      channel: the channel to segment when `axes` has a C axis longer than 1.
      threshold: the probability threshold; None: calibrated, else config.eval.threshold.
      tta: average over the 8 flips/rotations of each tile (8x the computation).
      instances: also return instance labels (split by the model's instance head when it
        has one, else connected components); min_size: smallest object kept, in pixels
        (None: config.eval.min_size).
      pixel_size: micrometres per pixel of the image; when the model's is known and differs
        by more than 10 %, the image is resized to it and the results back.
      diameter: the typical diameter of the image's objects in pixels (not with pixel_size;
        0: measured on a first pass): the image is resized so they match the model's
        (config.data.object_diameter).
      tile, overlap: the tiling (0: the training crop size; rounded up to a multiple of 32),
        as predict's --tile, --overlap.
      name: the image's name in messages and warnings.
      progress: called with the fraction done (0..1) after each batch of tiles.
    Returns:
      A Segmentation. Raises UserError (flmiseg.core.errors) for invalid axes, channel or options.
    """
    # Options.check() wants an output folder: nothing is written, so a placeholder passes.
    options = predict.Options(
        input=name, output=name, tile=tile, overlap=overlap, tta=tta, threshold=threshold,
        instances=instances, min_size=min_size, channel=channel, pixel_size=pixel_size,
        diameter=diameter)
    options.check()
    predict.check_diameter(self.config, diameter, self.folder)
    image = imagefile.from_array(image, axes or default_axes(np.shape(image), channel), name,
                                 pixel_size, missing_ok=True)
    planes, out_axes, out_shape = imagefile.select_planes(image, channel, name)
    planes, missing, notes = preprocess.repair(planes, name)
    with self._lock:
      predictor = self._predictor(options)
      options = predict.instance_options(self.config, self.folder, self.step, options)
      value, source = self.threshold(threshold)
      factor, resized, first = predict.planes_factor(predictor, planes, value, options,
                                                     pixel_size, missing)
      outputs, stats, mask, labels = predict.segment_planes(predictor, planes, factor, value,
                                                            options, progress, missing, first)
    warnings = [tiling.tile_note(options.tile, self.config),
                *notes,
                predict.image_warning(name, stats, mask, self.training)]
    warnings[:0] = [f'{name}: {note}' for note in resized]
    if instances and not self.has_instance_head:
      warnings.append(f'{self.folder} has no instance head: instances are connected '
                      'components of the mask, so touching objects stay merged')
    restore = lambda a: imagefile.restore_axes(a, out_axes, out_shape)  # noqa: E731
    return Segmentation(
        mask=restore(mask.astype(np.uint8)), prob=restore(outputs[..., 0]),
        labels=None if labels is None else restore(labels), axes=out_axes, threshold=value,
        threshold_source='threshold' if source == '--threshold' else source,
        warnings=tuple(w for w in warnings if w))

  def _predictor(self, options: predict.Options) -> predict.Predictor:
    """The Predictor of a tiling and TTA setting, made (and compiled) once."""
    key = (options.tta, options.tile, options.overlap)
    if key not in self._predictors:
      self._predictors[key] = predict.make_predictor(self.config, self.state, self.mesh,
                                                     options)
    return self._predictors[key]


def load(model: str | pathlib.Path, trust_imports: bool = False) -> Segmenter:
  """The Segmenter of a shipped model ('er', 'mito', 'nucleus') or of a run or packed
  folder, resolved as `--mode=predict --model=` resolves it."""
  return Segmenter(pretrained.resolve_model(str(model), setting='model'), trust_imports)
