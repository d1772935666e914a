"""Shared test helpers: tiny datasets written to disk, tiny configs, the environment of the
CLI processes that tests start."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import tifffile

from flmiseg.configs import default

REPO = pathlib.Path(__file__).resolve().parents[1]
# XLA flags of every test process and of the CLI processes tests start (tests/conftest.py):
# XLA's CPU fusion emitters compile a tiny model's train step 3x slower than its older emitter
# (measured: 5.1 s against 1.6 s for a width-4 U-Net), and tests need compile speed.
COMPILE_FAST = '--xla_cpu_use_fusion_emitters=false'


def cpu_xla_flags(devices: int) -> str:
  """XLA_FLAGS for a CPU process with `devices` devices: this process's XLA_FLAGS with its
  device count replaced (experiments/common.py has the same for the experiments, which the
  tests' helpers never import)."""
  kept = [f for f in os.environ.get('XLA_FLAGS', '').split()
          if not f.startswith('--xla_force_host_platform_device_count')]
  return ' '.join([f'--xla_force_host_platform_device_count={devices}', *kept])


def cli_env(devices: int, backend_level_0: bool = False) -> dict:
  """The environment of a `python -m flmiseg.main` process on `devices` fake CPU devices, with
  the test process's other XLA flags (COMPILE_FAST among them, tests/conftest.py) and, with
  `backend_level_0`, XLA's backend optimisation level 0."""
  xla = cpu_xla_flags(devices)
  if backend_level_0:
    xla += ' --xla_backend_optimization_level=0'
  return dict(os.environ, XLA_FLAGS=xla, JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO))


def run_cli(args, *, devices: int = 2, backend_level_0: bool = False, cwd=REPO,
            env: dict | None = None, timeout: float = 300, module: str = 'flmiseg.main',
            fresh: bool = False) -> subprocess.CompletedProcess:
  """`python -m <module> <args>` in `cwd` with `cli_env(devices, backend_level_0)` (updated
  with `env`), its output captured as text. The process is forked from a server that has
  imported the libraries (tests/cli_server.py); `fresh`: a new interpreter instead, for what
  only one shows (chatter while libraries import)."""
  full_env = dict(cli_env(devices, backend_level_0), **(env or {}))
  args = [str(a) for a in args]
  if fresh:
    return subprocess.run([sys.executable, '-m', module, *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
  from tests import cli_server  # pylint: disable=g-import-not-at-top
  return cli_server.run(args, env=full_env, cwd=cwd, timeout=timeout, module=module)


def write_blob_dataset(root, num_train=12, num_test=4, size=32, seed=0,
                       labels: bool = False) -> pathlib.Path:
  """A tiny dataset of bright noisy disks (16-bit) in the reference list format; with
  `labels` the masks are uint16 label images (disk k is k + 1 where no later disk covers it),
  else uint8 0/255."""
  rng = np.random.default_rng(seed)
  root = pathlib.Path(root)
  for split, n in (('train', num_train), ('test', num_test)):
    (root / split / 'images').mkdir(parents=True, exist_ok=True)
    (root / split / 'masks').mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
      yy, xx = np.mgrid[:size, :size]
      objects = np.zeros((size, size), np.uint16)
      for k in range(3):
        cy, cx, r = rng.uniform(4, size - 4, 2).tolist() + [rng.uniform(2, 6)]
        objects[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = k + 1
      mask = objects > 0
      image = 1000 + 20000 * mask + rng.normal(0, 3000, mask.shape)
      image = np.clip(image, 0, 65535).astype(np.uint16)
      name = f'{split}_{i:03d}.tif'
      tifffile.imwrite(root / split / 'images' / name, image)
      tifffile.imwrite(root / split / 'masks' / name,
                       objects if labels else (mask * 255).astype(np.uint8))
      lines.append(f'{split}/images/{name} {split}/masks/{name}')
    (root / f'{split}.txt').write_text('\n'.join(lines) + '\n')
  return root


def tiny_config(data_root, **overrides):
  """The default config shrunk for tests: width 4 U-Net, 32x32 crops, a few steps."""
  config = default.get_config()
  config.data.source = 'lists'
  config.data.train_list = str(pathlib.Path(data_root) / 'train.txt')
  config.data.test_list = str(pathlib.Path(data_root) / 'test.txt')
  config.data.crop_size = 32
  config.data.val_fraction = 0.25
  config.model.width = 4
  config.train.num_steps = 6
  config.train.batch_size = 8
  config.train.log_every_steps = 2
  config.optim.warmup_steps = 0
  config.eval.every_steps = 2
  config.eval.batch_size = 8
  for key, value in overrides.items():
    section, field = key.split('.')
    config[section][field] = value
  return config


def init_variables(model, *inputs, seed: int = 0) -> dict:
  """Variables of `model` for `inputs`, drawn in numpy from the shapes that `model.init`
  gives (jax.eval_shape: no compilation). A jitted init compiles the whole forward pass,
  nearly as long as the gradient itself for a deep network (10.6 s against 15.0 s for a
  width-4 HRNet on the idle 2-core CPU); tests of shapes and gradients need finite, non-zero
  values, not Flax's initialisers.
  Kernels: normal with variance 1/fan_in; biases 0; BatchNorm scales 1, running means 0 and
  variances 1; other parameters normal with standard deviation 0.1."""
  import jax  # pylint: disable=g-import-not-at-top  (this module imports no JAX at load)
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(model.init, jax.random.key(seed), *inputs)

  def draw(path, leaf):
    name = getattr(path[-1], 'key', '')
    if name in ('bias', 'mean'):
      value = np.zeros(leaf.shape)
    elif name in ('scale', 'var'):
      value = np.ones(leaf.shape)
    elif name == 'kernel':
      value = rng.normal(size=leaf.shape) / np.sqrt(max(1, np.prod(leaf.shape[:-1])))
    else:
      value = 0.1 * rng.normal(size=leaf.shape)
    return jax.numpy.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)
