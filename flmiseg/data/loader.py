"""From `config.data` to prepared train / validation / test sources.

source='synthetic': simulate `kind` once into a cache folder (reused on later runs);
source='lists': read the user's train and test lists (or images/ + masks/ folders);
source='object_masks': folders of <id>/images/<id>.png + <id>/masks/*.png, one mask file per
object (flmiseg/data/objectmasks.py).
The validation split is config.data.val_list when given, else carved out of the training list;
the test list is only ever used for the final evaluation, never for model selection.

Mixed training (config.data.synthetic_fraction > 0, a real source): the training source is a
mixing.MixedSource of the real training images and the simulated training images that the
synthetic_* fields describe; validation and test stay real.
"""

import dataclasses
import os
import pathlib

from absl import logging
import numpy as np
import tifffile

from flmiseg.data import dataset
from flmiseg.data import lists
from flmiseg.data import mixing
from flmiseg.data import objectmasks
from flmiseg.core.errors import UserError

SOURCES = ('synthetic', 'lists', 'object_masks')


@dataclasses.dataclass(frozen=True)
class Datasets:
  train: dataset.PreparedSource | mixing.MixedSource
  val: dataset.PreparedSource | None
  test: dataset.PreparedSource | None


def default_cache_root() -> pathlib.Path:
  root = os.environ.get('FLMISEG_CACHE') or os.path.join(
      os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'flmiseg')
  return pathlib.Path(root)


def _without_labels(folder: pathlib.Path, kind: str) -> bool:
  """Whether a cached dataset of an instance kind (simulate.INSTANCE_KINDS) was simulated
  before its masks became label images (uint8 0/255 then, uint16 labels now): it is made
  again (the same images, bit for bit), else the instance head would learn merged objects."""
  from flmiseg.data import simulate  # pylint: disable=g-import-not-at-top
  if kind not in simulate.INSTANCE_KINDS:
    return False
  for split in ('train', 'test'):
    fields = (folder / f'{split}.txt').read_text().split()
    if len(fields) >= 2:
      with tifffile.TiffFile(folder / fields[1]) as tif:
        return tif.pages[0].dtype != np.uint16
  return False


def _older_preset(folder: pathlib.Path, kind: str, knobs: str) -> bool:
  """Whether a cached randomised dataset was drawn from other distributions than the
  current preset's (simulate_random.PRESETS, KIND_PRESETS changed since, or a dataset made
  before synthetic.PRESET_FILE was written): it is made again, else a run would silently
  train on the old ones."""
  from flmiseg.data import synthetic  # pylint: disable=g-import-not-at-top
  if knobs == 'default':
    return False
  stamp = folder / synthetic.PRESET_FILE
  return not stamp.is_file() or stamp.read_text() != synthetic.preset_stamp(kind, knobs)


def synthetic_masks(data_cfg) -> str:
  """How the simulated masks of `data_cfg` are drawn (config.data.synthetic_masks; configs made
  before it drew 'geometry'): the masks a model trained on them learned to draw."""
  return data_cfg.get('synthetic_masks', 'geometry')


def synthetic_dataset_dir(data_cfg, seed: int) -> pathlib.Path:
  """Makes (once) and returns the folder of the simulated dataset `data_cfg` describes.

  Raises ValueError for an invalid config.data.synthetic_params or kind.
  """
  # Imported here: the simulator is only needed on this path.
  from flmiseg.data import simulate  # pylint: disable=g-import-not-at-top
  from flmiseg.data import synthetic  # pylint: disable=g-import-not-at-top
  knobs = data_cfg.get('synthetic_params', 'default')  # absent from configs made before it
  if knobs not in ('default',) + synthetic.RANDOMIZE:
    raise ValueError(f'config.data.synthetic_params={knobs!r} is not valid; valid: default, '
                     f'{", ".join(synthetic.RANDOMIZE)}')
  masks = synthetic_masks(data_cfg)
  if masks not in simulate.MASKS:
    raise ValueError(f'config.data.synthetic_masks={masks!r} is not valid; valid: '
                     f'{", ".join(simulate.MASKS)}')
  root = pathlib.Path(data_cfg.synthetic_dir) if data_cfg.synthetic_dir else (
      default_cache_root() / 'synthetic')
  # 'default' keeps the original folder names, so existing cached datasets are reused.
  name = (f'{data_cfg.kind}_{data_cfg.num_synthetic_train}+{data_cfg.num_synthetic_test}'
          f'_{data_cfg.synthetic_size}px_seed{seed}' + ('' if knobs == 'default' else
                                                         f'_{knobs}')
          + ('' if masks == 'geometry' else f'_{masks}'))
  out = root / name
  if not ((out / 'train.txt').is_file() and (out / 'test.txt').is_file()) or _without_labels(
      out, data_cfg.kind) or _older_preset(out, data_cfg.kind, knobs):
    if data_cfg.kind not in simulate.KINDS:
      raise ValueError(f'config.data.kind={data_cfg.kind!r} is not a kind; valid: '
                       f'{", ".join(simulate.KINDS)}')
    logging.info('Simulating %s into %s (once; later runs reuse it)', name, out)
    synthetic.write_dataset(data_cfg.kind, out, num_train=data_cfg.num_synthetic_train,
                           num_test=data_cfg.num_synthetic_test,
                           size=data_cfg.synthetic_size, seed=seed, overwrite=True,
                           randomize='' if knobs == 'default' else knobs, masks=masks)
  return out


def data_seed(config) -> int:
  """The seed of the simulated dataset: config.data.seed (config.seed seeds the model, the
  shuffling and the validation split). A config made before data.seed existed simulated its
  data with config.seed."""
  return config.data.get('seed', config.seed)


def list_paths(config) -> tuple[pathlib.Path, pathlib.Path | None]:
  """(train list, test list) that config.data points at; ValueError for an invalid source.
  (source='object_masks': the folders of samples.)"""
  data_cfg = config.data
  if data_cfg.source == 'synthetic':
    folder = synthetic_dataset_dir(data_cfg, data_seed(config))
    return folder / 'train.txt', folder / 'test.txt'
  if data_cfg.source not in SOURCES:
    raise ValueError(f'config.data.source={data_cfg.source!r} is not a source; valid: '
                     f'{", ".join(SOURCES)}')
  if not data_cfg.train_list:
    # Not a bad value but a missing input (configs/finetune.py leaves it to the user).
    what = ('a folder of <id>/images/ and <id>/masks/ folders'
            if data_cfg.source == 'object_masks' else
            'a list file or a folder with images/ and masks/')
    raise UserError(f'config.data.source={data_cfg.source} needs config.data.train_list '
                    f'({what})')
  test = pathlib.Path(data_cfg.test_list) if data_cfg.test_list else None
  return pathlib.Path(data_cfg.train_list), test


def synthetic_fraction(config) -> float:
  """config.data.synthetic_fraction (0 for configs made before it); UserError when it mixes
  simulated images into a source that is simulated already."""
  fraction = config.data.get('synthetic_fraction', 0.0)
  if fraction and config.data.source == 'synthetic':
    raise UserError(f'config.data.synthetic_fraction={fraction} mixes simulated images into '
                    'real ones: it needs config.data.source=lists or object_masks')
  return fraction


def _pairs(config, spec, cache_dir: pathlib.Path) -> list[lists.Pair]:
  if config.data.source == 'object_masks':
    return objectmasks.load_pairs(spec, cache_dir)
  return lists.load_pairs(spec)


def load(config, cache_dir, need_train: bool = True) -> Datasets:
  """Prepared train/val/test sources for `config`; images are normalised once and cached."""
  data_cfg = config.data
  if not data_cfg.pixel_size >= 0:
    raise ValueError(f'config.data.pixel_size={data_cfg.pixel_size}: must be >= 0 '
                     '(micrometres per pixel; 0 = unknown)')
  cache_dir = pathlib.Path(cache_dir)
  train_spec, test_spec = list_paths(config)
  instances = bool(config.model.get('instance_head'))
  prep = lambda pairs, train, real=True: dataset.prepare(  # pylint: disable=g-long-lambda
      pairs, data_cfg.normalization, data_cfg.kind, cache_dir, require_foreground=train,
      # Simulated masks are label images with every pixel labelled, in one channel.
      ignore_value=data_cfg.ignore_value if real else -1,
      instance_targets=train and instances, channel=data_cfg.channel if real else -1)
  train = val = None
  if data_cfg.get('val_list'):  # a fixed validation set (also for --mode=eval's calibration)
    val = prep(_pairs(config, data_cfg.val_list, cache_dir), False)
  if need_train:
    train = prep(_pairs(config, train_spec, cache_dir), True)
    if val is None:
      train, val = dataset.split_validation(train, data_cfg.val_fraction, config.seed)
    fraction = synthetic_fraction(config)  # training only: eval may name another source
    if fraction:
      folder = synthetic_dataset_dir(data_cfg, data_seed(config))
      simulated = prep(lists.load_pairs(folder / 'train.txt'), True, real=False)
      train = mixing.MixedSource(train, simulated, fraction)
  test = prep(_pairs(config, test_spec, cache_dir), False) if test_spec is not None else None
  return Datasets(train, val, test)
