"""Input pipeline throughput: read + preprocess + augment + batch, and where to augment.

  python -m experiments.benchmarks.pipeline_benchmark [--num_images=64] [--size=256] [--batch=16]

Writes `num_images` 16-bit TIFFs (size x size) to a temporary folder and measures, in
images/s on this machine:
  * cold preparation: read TIFF + CLAHE + z-score + cache (once per image per run);
  * the training pipeline from the cache (random crop + one of 8 flips/rotations + batching)
    with 0 (in-process), 1 and 2 grain worker processes;
  * the same augmentation done on the device inside a jitted function with explicit PRNG keys,
    for the host-vs-device decision.
Prints one JSON object.
"""

import json
import pathlib
import tempfile
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import tifffile

from flmiseg.data import dataset
from flmiseg.data import lists
from flmiseg.data import pipeline


def define_flags():
  """Defines the command-line flags (only when run as a script, so modules import together)."""
  flags.DEFINE_integer('num_images', 64, 'Images in the benchmark dataset.')
  flags.DEFINE_integer('size', 256, 'Image side (pixels).')
  flags.DEFINE_integer('batch', 16, 'Batch size.')
  flags.DEFINE_integer('num_batches', 40, 'Batches timed per pipeline setting.')


FLAGS = flags.FLAGS


def _write_images(root: pathlib.Path, n: int, size: int) -> pathlib.Path:
  rng = np.random.default_rng(0)
  (root / 'images').mkdir(parents=True)
  (root / 'masks').mkdir(parents=True)
  for i in range(n):
    image = rng.gamma(2.0, 3000.0, (size, size)).clip(0, 65535).astype(np.uint16)
    tifffile.imwrite(root / 'images' / f'{i:04d}.tif', image)
    tifffile.imwrite(root / 'masks' / f'{i:04d}.tif', (image > 9000).astype(np.uint8) * 255)
  return root


def _time_pipeline(source, workers: int, batch: int, num_batches: int, crop: int) -> float:
  it = iter(pipeline.train_dataset(source, crop_size=crop, global_batch=batch,
                                   num_steps=num_batches + 5, seed=0, num_workers=workers))
  for _ in range(3):  # warm up (worker start-up)
    next(it)
  start = time.perf_counter()
  for _ in range(num_batches):
    next(it)
  return num_batches * batch / (time.perf_counter() - start)


def _device_augment(key, images, masks, crop: int):
  """Random crop + random D4 element per image, on the device."""
  n, h, w, _ = images.shape
  keys = jax.random.split(key, n)

  def one(k, image, mask):
    k1, k2, k3 = jax.random.split(k, 3)
    top = jax.random.randint(k1, (), 0, h - crop + 1)
    left = jax.random.randint(k2, (), 0, w - crop + 1)
    image = jax.lax.dynamic_slice(image, (top, left, 0), (crop, crop, 1))
    mask = jax.lax.dynamic_slice(mask, (top, left, 0), (crop, crop, 1))
    g = jax.random.randint(k3, (), 0, 8)
    branches = [lambda a, k=k: pipeline_d4(a, k) for k in range(8)]
    return (jax.lax.switch(g, branches, image), jax.lax.switch(g, branches, mask))

  return jax.vmap(one)(keys, images, masks)


def pipeline_d4(a, k: int):
  a = jnp.rot90(a, k % 4, axes=(0, 1))
  return a[:, ::-1] if k >= 4 else a


def _time_device_augment(source, batch: int, num_batches: int, crop: int) -> float:
  images = jnp.asarray(np.stack([source[i]['image'] for i in range(batch)])[..., None])
  masks = jnp.asarray(np.stack([source[i]['mask'] for i in range(batch)])[..., None],
                      jnp.float32)
  fn = jax.jit(lambda k, x, y: _device_augment(k, x, y, crop))
  jax.block_until_ready(fn(jax.random.key(0), images, masks))
  start = time.perf_counter()
  for i in range(num_batches):
    out = fn(jax.random.key(i), images, masks)
  jax.block_until_ready(out)
  return num_batches * batch / (time.perf_counter() - start)


def main(_):
  results = {'machine': f'{jax.devices()[0].device_kind}, {jax.device_count()} device(s)'}
  with tempfile.TemporaryDirectory() as tmp:
    root = _write_images(pathlib.Path(tmp) / 'data', FLAGS.num_images, FLAGS.size)
    pairs = lists.read_folder(root)
    start = time.perf_counter()
    source = dataset.prepare(pairs, 'clahe_zscore', 'er', pathlib.Path(tmp) / 'cache')
    results['prepare_images_per_s'] = len(pairs) / (time.perf_counter() - start)
    for workers in (0, 1, 2):
      results[f'pipeline_{workers}_workers_images_per_s'] = _time_pipeline(
          source, workers, FLAGS.batch, FLAGS.num_batches, FLAGS.size // 2)
    results['device_augment_images_per_s'] = _time_device_augment(
        source, FLAGS.batch, FLAGS.num_batches, FLAGS.size // 2)
  print(json.dumps({k: round(v, 1) if isinstance(v, float) else v
                    for k, v in results.items()}))


if __name__ == '__main__':
  define_flags()
  app.run(main)
