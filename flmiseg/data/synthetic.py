"""Simulated datasets on disk: `write_dataset` writes a kind's train and test images and masks
in the list format (flmiseg/data/lists.py), each image drawn from its own seed (`image_rng`),
with the simulator's default knobs (flmiseg/data/simulate.py) or knobs drawn per image from a
preset (`RANDOMIZE`, flmiseg/data/simulate_random.py), which PRESET_FILE records so a cached
dataset drawn from an older preset is told apart (flmiseg/data/loader.py caches them).
`python -m flmiseg.cli.simulate` is its command.
"""

import dataclasses
import json
import os
import pathlib
import shutil

import numpy as np
import tifffile

from flmiseg.core.errors import UserError
from flmiseg.data import simulate
from flmiseg.data import simulate_random

_SPLITS = {'train': 0, 'test': 1}
RANDOMIZE = ('wide', 'shifted')  # write_dataset's presets of random_params


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
  """The generator of image `index` of `split`: each image is reproducible on its own."""
  return np.random.default_rng(np.random.SeedSequence([seed, _SPLITS[split], index]))


def params_rng(seed: int, split: str, index: int) -> np.random.Generator:
  """The generator of image `index`'s random knobs: a child of image_rng's seed, so drawing
  the knobs leaves the image's own stream (geometry, noise) as it is."""
  return np.random.default_rng(
      np.random.SeedSequence([seed, _SPLITS[split], index]).spawn(1)[0])


def _check_dataset_args(kind, out, num_train, num_test, size, overwrite, params, randomize,
                        masks='geometry'):
  simulate.resolve(kind, params)
  if randomize and params is not None:
    raise UserError(f'randomize={randomize!r} draws the knobs; pass it or params, not both')
  if randomize not in ('',) + RANDOMIZE:
    raise UserError(f'randomize={randomize!r} is not a preset; valid: {", ".join(RANDOMIZE)} '
                    "or '' (the kind's defaults)")
  simulate._check_masks(masks)
  if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
    raise UserError(f'{out} is not empty; choose another folder or pass --overwrite')
  if min(num_train, num_test) < 0 or num_train + num_test == 0 or size < 16:
    raise UserError(f'need num_train, num_test >= 0 (not both 0) and size >= 16; got '
                    f'{num_train}, {num_test}, {size}')


PRESET_FILE = 'preset.json'  # the distributions a randomised dataset was drawn from


def preset_stamp(kind: str, randomize: str) -> str:
  """JSON of the distributions `simulate_random.preset_specs(randomize, kind)` draws from:
  what write_dataset records in PRESET_FILE, so a cached dataset drawn from an older preset
  can be told apart from one the current code would draw."""
  return json.dumps(simulate_random.preset_specs(randomize, kind), sort_keys=True) + '\n'


def write_dataset(kind: str, out_dir, num_train: int, num_test: int, size: int = 256,
                  seed: int = 0, overwrite: bool = False, params: simulate.Params | None = None,
                  randomize: str = '', masks: str = 'geometry') -> pathlib.Path:
  """Simulates a dataset in the reference's list format.

  Writes out_dir/{train,test}/{images,masks}/<kind>_<index>.tif and out_dir/train.txt,
  out_dir/test.txt (one `image mask` pair per line, relative to out_dir). randomize='wide' or
  'shifted' draws each image's knobs with random_params from params_rng(seed, split, index)
  and records them in out_dir/{train,test}_params.jsonl (one JSON object per image, in list
  order). `masks` says how masks are drawn (simulate.MASKS). The folder is built next to out_dir and
  renamed at the end, so an interrupted run never leaves a half-written dataset behind.
  Refuses a non-empty out_dir unless overwrite.
  """
  out = pathlib.Path(out_dir)
  _check_dataset_args(kind, out, num_train, num_test, size, overwrite, params, randomize,
                      masks)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_name(f'.{out.name}.partial-{os.getpid()}')
  shutil.rmtree(tmp, ignore_errors=True)
  for split, count in (('train', num_train), ('test', num_test)):
    (tmp / split / 'images').mkdir(parents=True)
    (tmp / split / 'masks').mkdir(parents=True)
    lines, knobs = [], []
    for i in range(count):
      p = (simulate_random.random_params(kind, params_rng(seed, split, i), randomize)
           if randomize else params)
      image, mask = simulate.simulate(kind, size, image_rng(seed, split, i), p,
                                      labels=kind in simulate.INSTANCE_KINDS, masks=masks)
      name = f'{kind}_{i:05d}.tif'
      tifffile.imwrite(tmp / split / 'images' / name, image, compression='zlib')
      tifffile.imwrite(tmp / split / 'masks' / name, mask, compression='zlib')
      lines.append(f'{split}/images/{name} {split}/masks/{name}\n')
      if randomize:
        knobs.append(json.dumps(dict(image=f'{split}/images/{name}', **dataclasses.asdict(p)),
                                sort_keys=True) + '\n')
    (tmp / f'{split}.txt').write_text(''.join(lines))
    if randomize:
      (tmp / f'{split}_params.jsonl').write_text(''.join(knobs))
  if randomize:
    (tmp / PRESET_FILE).write_text(preset_stamp(kind, randomize))
  if out.exists():
    shutil.rmtree(out) if out.is_dir() else out.unlink()
  os.replace(tmp, out)
  return out
