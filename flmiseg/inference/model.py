"""A trained model, loaded once: the object every inference path segments with.

  import flmiseg
  model = flmiseg.load('nucleus')       # a shipped model (er, mito, nucleus) or a folder
  result = model.segment(image)         # a (H, W) array of any dtype
  result.mask                           # uint8 0/1, (H, W)
  model.segment(stack, axes='CZYX', channel=1, threshold=0.4, tta=True, instances=True).labels

Loading reads everything inference needs from the run or packed folder, once
(flmiseg/store/): the config, the weights of the best checkpoint and their step, the threshold
and instance-seed settings (flmiseg/store/settings.py: calibrated for that checkpoint, else the
config's), the training images' statistics (for the warnings), the object diameter and pixel
size. It checks only what inference uses (`check_config`), and builds no training state.

`Model.segment` runs the inference core (flmiseg/inference/segment.py) that --mode=predict runs
on files (flmiseg/cli/predict.py), so the mask of an array equals the `_mask.tif` predict
writes for a file of the same pixels and options, bit for bit. A Model keeps its compiled
forward passes (one per TTA, tile, overlap and batch setting); calls may come from any thread
(the napari widget calls from a worker thread) and run one at a time.
"""

import dataclasses
import pathlib
import threading
from typing import Callable

import jax
import numpy as np

from flmiseg import models
from flmiseg.core import registry
from flmiseg.core import sharding
from flmiseg.core.errors import UserError
from flmiseg.data import imagefile
from flmiseg.data import preprocess
from flmiseg.inference import segment as core
from flmiseg.inference import tiling
from flmiseg.store import pretrained
from flmiseg.store import rundir
from flmiseg.store import settings as stored
from flmiseg.store import weights

# An array's last axis is taken for its channels (YXC) when it is at most this long and
# shorter than Y and X (`default_axes`).
MAX_LAST_CHANNELS = 8
# The config's numeric inference fields: (lowest, highest or None, integer).
FIELD_RANGES = {'eval.threshold': (0, 1, False), 'eval.seed_dynamic': (0, 1, False),
                    'eval.min_size': (0, None, True), 'eval.batch_size': (1, None, True),
                    'data.crop_size': (1, None, True)}


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: arrays have no truth value.
class Segmentation:
  """What `Model.segment` returns for one image; arrays have the image's shape without its
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


def check_config(config) -> None:
  """Raises UserError (one line) unless what inference reads of `config` is valid: the
  numeric inference fields (FIELD_RANGES), the dtype, the normalisation and the model
  (name, variant, fusion, backbone, instance head) that `config.model` names."""
  for field, (low, high, integer) in FIELD_RANGES.items():
    section, name = field.split('.')
    value = config[section].get(name)
    kinds = (int,) if integer else (int, float)
    if value is None or (isinstance(value, kinds) and not isinstance(value, bool) and
                         low <= value and (high is None or value <= high)):
      continue
    what = 'an integer' if integer else 'a number'
    bounds = f'>= {low}' if high is None else f'in [{low}, {high}]'
    raise UserError(f'config.{field}={value!r}: must be {what} {bounds}')
  try:
    weights.compute_dtype(config)
    preprocess.resolve(config.data.normalization, config.data.kind)
    models.create_model(config.model, np.float32)
  except (ValueError, TypeError) as e:
    raise UserError(' '.join(str(e).split())) from e


class Model:
  """A trained model, loaded once, that segments arrays (see the module docstring).

  Attributes:
    folder: the run or packed folder.
    config: its config (with the command line's inference settings, as main resolves it).
    state: the weights (weights.InferenceState), replicated over `mesh`; `variables`.
    step: the checkpoint step of the weights.
    calibration: DIR/calibration.json (None without one).
    threshold, threshold_source: the model's own threshold and where it came from
      ('calibrated' or 'config.eval.threshold').
    seed_dynamic, min_size: the instance seeds' settings.
    input_stats: the training images' statistics (DIR/input_stats.json), or None.
  """

  def __init__(self, folder, config, devices=None):
    """Loads the model in `folder` (a trained run or packed model) with `config` (its
    rundir.read_config, or main's rundir.inference_config): its weights over `devices`
    (default: this process's)."""
    check_config(config)
    self.folder, self.config = pathlib.Path(folder), config
    self.mesh = sharding.make_mesh(jax.local_devices() if devices is None else devices)
    self.state, self.step = weights.load(config, self.folder, self.mesh)
    self.calibration = stored.read_calibration(self.folder)
    self.threshold, self.threshold_source = stored.threshold(config, self.calibration,
                                                             self.step)
    self.seed_dynamic = stored.seed_dynamic(config, self.calibration, self.step)
    self.min_size = stored.min_size(config)
    self.input_stats = rundir.read_input_stats(self.folder)
    self._predictors = {}
    self._lock = threading.Lock()

  @property
  def variables(self) -> dict:
    """{'params', 'batch_stats'} of the loaded checkpoint."""
    return {'params': self.state.params, 'batch_stats': self.state.batch_stats}

  @property
  def has_instance_head(self) -> bool:
    """Whether instances split touching objects (else they are connected components)."""
    return bool(self.config.model.get('instance_head'))

  @property
  def object_diameter(self) -> float | None:
    """The training objects' typical diameter, pixels (config.data.object_diameter), or None."""
    return self.config.data.get('object_diameter', 0.0) or None

  @property
  def pixel_size(self) -> float | None:
    """Micrometres per pixel of the training images (config.data.pixel_size), or None."""
    return self.config.data.pixel_size or None

  def resolved(self, settings: core.Settings,
               measure: bool = True) -> tuple[core.Settings, str]:
    """(`settings` with the threshold, seed dynamic, min size, diameter and dim gain it leaves
    to the model filled in (flmiseg/store/settings.py), where the threshold came from).
    `measure`: whether passes over the whole plane may come first (not block by block,
    flmiseg/chunked/): one that measures the objects, and the dim pass, which needs the first
    pass's objects over the whole plane (without it the dim gain is 0)."""
    threshold, source = stored.threshold(self.config, self.calibration, self.step,
                                         settings.threshold)
    return dataclasses.replace(
        settings, threshold=threshold, min_size=stored.min_size(self.config, settings.min_size),
        seed_dynamic=stored.seed_dynamic(self.config, self.calibration, self.step,
                                         settings.seed_dynamic),
        diameter=stored.diameter(self.config, settings.diameter, settings.pixel_size,
                                 settings.rescale, measure),
        dim_gain=stored.dim_gain(self.config, settings.dim_gain) if measure else 0.0), source

  def predictor(self, settings: core.Settings) -> core.Predictor:
    """The JAX Predictor of `settings`' TTA, tile (`tiling.network_tile`), overlap and batch
    size (0: config.eval.batch_size, rounded to the devices), compiled once per setting."""
    key = (settings.tta, settings.tile, settings.overlap, settings.batch_size)
    if key not in self._predictors:
      batch = settings.batch_size or self.config.eval.batch_size
      self._predictors[key] = core.Predictor(
          tiling.prob_fn(self.state, self.mesh, settings.tta), self.config,
          tiling.network_tile(settings.tile, self.config), settings.overlap,
          tiling.round_up_batch(batch, self.mesh.size), batch_multiple=self.mesh.size)
    return self._predictors[key]

  def instance_note(self) -> str | None:
    """The warning for instances of a model without an instance head, else None."""
    if self.has_instance_head:
      return None
    return (f'{self.folder} has no instance head (config.model.instance_head): instances are '
            'connected components of the mask, so touching objects stay merged')

  def segment(self, image: np.ndarray, axes: str | None = None, channel: int | None = None,
              threshold: float | None = None, tta: bool = False, instances: bool = False,
              min_size: int | None = None, pixel_size: float | None = None,
              diameter: float | None = None, rescale: bool = True, tile: int = 0,
              overlap: float = 0.25, dim_gain: float | None = None,
              progress: Callable[[float], None] | None = None,
              name: str = 'image') -> Segmentation:
    """Segments one image.

    Args:
      image: the pixels, any dtype (8/16-bit, float), 2-D or more.
      axes: one letter per dimension from 'TZCYX' ('S': RGB(A) samples, made one plane),
        e.g. 'YX', 'CYX', 'YXC', 'ZYX'; None or '': `default_axes`.
      channel: the channel to segment when `axes` has a C axis longer than 1.
      threshold: the probability threshold; None: the model's (`threshold`).
      tta: average over the 8 flips/rotations of each tile (8x the computation).
      instances: also return instance labels (split by the model's instance head when it
        has one, else connected components); min_size: smallest object kept, in pixels
        (None: config.eval.min_size).
      pixel_size: micrometres per pixel of the image; when the model's is known and differs
        by more than 10 %, the image is resized to it and the results back.
      diameter: the typical diameter of the image's objects in pixels (not with pixel_size;
        0: measured on a first pass): the image is resized so they match the model's
        (config.data.object_diameter). None: the model's choice, measured on a first pass
        where its config.eval.measure_diameter says so (the shipped nucleus model), else
        not resized by its objects.
      rescale: False: never resize the image (no pixel size, diameter or measurement), as
        predict's --no_rescale.
      tile, overlap: the tiling (0: the training crop size; rounded up to a multiple of 32),
        as predict's --tile, --overlap.
      dim_gain: a second pass with the image's bright parts clipped at 1/dim_gain of its
        range adds the objects too dim for the first (docs/inference.md); 0: none; None: the
        model's (config.eval.dim_gain), as predict's --dim_gain.
      progress: called with the fraction done (0..1) after each batch of tiles.
      name: the image's name in messages and warnings.
    Returns:
      A Segmentation. Raises UserError (flmiseg.core.errors) for invalid axes, channel or
      options.
    """
    settings = core.Settings(tile=tile, overlap=overlap, tta=tta, threshold=threshold,
                             instances=instances, min_size=min_size, channel=channel,
                             pixel_size=pixel_size, diameter=diameter, rescale=rescale,
                             dim_gain=dim_gain)
    settings.check()
    core.check_diameter(self.config, diameter, self.folder)
    core.check_dim_gain(self.config, dim_gain, self.folder)
    image = imagefile.from_array(image, axes or default_axes(np.shape(image), channel), name,
                                 pixel_size, missing_ok=True)
    planes, out_axes, out_shape = imagefile.select_planes(image, channel, name)
    planes, missing, notes = preprocess.repair(planes, name)
    with self._lock:
      predictor = self.predictor(settings)
      settings, source = self.resolved(settings)
      found = core.segment_planes(predictor, planes, settings, pixel_size, missing, progress)
    warnings = [*(f'{name}: {note}' for note in found.notes),
                tiling.tile_note(tile, self.config), *notes,
                core.image_warning(name, found.stats, found.mask, self.input_stats),
                self.instance_note() if instances else None]
    restore = lambda a: imagefile.restore_axes(a, out_axes, out_shape)  # noqa: E731
    return Segmentation(
        mask=restore(found.mask.astype(np.uint8)), prob=restore(found.outputs[..., 0]),
        labels=None if found.labels is None else restore(found.labels), axes=out_axes,
        threshold=settings.threshold, threshold_source=source,
        warnings=tuple(w for w in warnings if w))


def load(name_or_dir: str | pathlib.Path, trust_imports: bool = False, config=None,
         devices=None) -> Model:
  """The Model of a shipped model ('er', 'mito', 'nucleus') or of a run or packed folder,
  resolved as `--mode=predict --model=` resolves it.

  Args:
    name_or_dir: the shipped model's name, or the folder.
    trust_imports: import the code the folder's config names (config.imports); without it a
      folder that names some is refused (flmiseg/store/rundir.py: `imports_to_run`).
    config: the config to use instead of the folder's (main passes the one it resolved, with
      the command line's inference settings and its imports done); None: the folder's.
    devices: the devices the weights go to (default: this process's).
  """
  folder = rundir.check_trained(pretrained.resolve_model(str(name_or_dir), setting='model'))
  if config is None:
    config = rundir.read_config(folder)
    registry.import_modules(rundir.imports_to_run(folder, config, None, trust_imports))
  return Model(folder, config, devices)
