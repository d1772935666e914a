"""Where the CPU time of the width-64 U-Net goes: each of its 3x3 convolutions alone, and the
whole forward pass, under XLA (and PyTorch's oneDNN beside it, when torch is importable).

  python -m experiments.benchmarks.conv_profile [--torch]
  XLA_FLAGS=... python -m experiments.benchmarks.conv_profile   # the effect of an XLA flag

Batch 4 at 256x256 input, fp32, median of 5 timed calls after a warm-up. The table in
docs/benchmarks.md ("The profile that explains the gap") comes from this script.
"""

import os
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from flmiseg.models import unet

FLAGS = flags.FLAGS
BATCH = 4
# (H = W, input channels, output channels) of the U-Net's 3x3 convolutions at width 64 and
# 256x256 (the first, 1 -> 64, is negligible): encoder and decoder DoubleConvs.
SHAPES = ((256, 64, 64), (256, 128, 64), (128, 64, 128), (128, 128, 128), (128, 256, 128),
          (64, 128, 256), (64, 256, 256), (64, 512, 256), (32, 256, 512), (32, 512, 512),
          (32, 1024, 512), (16, 512, 1024), (16, 1024, 1024))
# Shapes used twice in the network (encoder and decoder second convolutions).
TWICE = ((256, 64, 64), (128, 128, 128), (64, 256, 256), (32, 512, 512))


def define_flags():
  flags.DEFINE_bool('torch', False, 'Also time torch.nn.functional.conv2d (if importable).')


def median_seconds(fn, repeats: int = 5) -> float:
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def conv_flops(hw: int, cin: int, cout: int) -> float:
  return 2.0 * BATCH * hw * hw * cin * cout * 9


def xla_conv_seconds(hw: int, cin: int, cout: int) -> float:
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.random((BATCH, hw, hw, cin), np.float32))
  w = jnp.asarray(rng.random((3, 3, cin, cout), np.float32))
  conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')))
  return median_seconds(lambda: conv(x, w).block_until_ready())


def torch_conv_seconds(hw: int, cin: int, cout: int) -> float:
  import torch  # pylint: disable=g-import-not-at-top  # optional, never a dependency
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  rng = np.random.default_rng(0)
  x = torch.from_numpy(rng.random((BATCH, cin, hw, hw), np.float32))
  w = torch.from_numpy(rng.random((cout, cin, 3, 3), np.float32))
  with torch.no_grad():
    return median_seconds(lambda: torch.nn.functional.conv2d(x, w, padding=1))


def forward_seconds() -> float:
  model = unet.UNet(width=64)
  x = jnp.asarray(np.random.default_rng(0).random((BATCH, 256, 256, 1), np.float32))
  variables = jax.jit(lambda x: model.init(jax.random.key(0), x[:1]))(x)
  forward = jax.jit(lambda v, x: jax.nn.sigmoid(model.apply(v, x, train=False)[0]))
  return median_seconds(lambda: forward(variables, x).block_until_ready())


def main(argv):
  del argv
  print('| H=W | in -> out | GFLOP | XLA ms (GFLOP/s) |' + (' PyTorch ms (GFLOP/s) |'
                                                          if FLAGS.torch else ''))
  print('|---|---|---|---|' + ('---|' if FLAGS.torch else ''))
  total_xla = total_torch = 0.0
  for hw, cin, cout in SHAPES:
    gflop = conv_flops(hw, cin, cout) / 1e9
    t = xla_conv_seconds(hw, cin, cout)
    total_xla += t
    row = f'| {hw} | {cin} -> {cout} | {gflop:.1f} | {t * 1e3:.0f} ({gflop / t:.0f}) |'
    if FLAGS.torch:
      tt = torch_conv_seconds(hw, cin, cout)
      total_torch += tt
      row += f' {tt * 1e3:.0f} ({gflop / tt:.0f}) |'
    print(row, flush=True)
  print(f'| **sum** | | | **{total_xla * 1e3:.0f}** |' +
        (f' **{total_torch * 1e3:.0f}** |' if FLAGS.torch else ''))
  t = forward_seconds()
  print(f'\nU-Net forward (width 64, batch {BATCH}, 256x256): {t:.3f} s per batch, '
        f'{BATCH / t:.2f} images/s')


if __name__ == '__main__':
  define_flags()
  app.run(main)
