"""experiments/benchmarks/benchmark.py at a tiny size: the JSON's fields and its FLOP arithmetic."""

import math

import jax.numpy as jnp
import pytest

from experiments.benchmarks import benchmark
from flmiseg.models import summary
from flmiseg.models import unet


def test_benchmark_json_tiny():
  result = benchmark.run('unet', 'original', width=4, size=32, batch=8,
                         dtypes=('float32', 'bfloat16'), repeats=1, steps=1)
  assert result['platform'] == 'cpu' and result['num_devices'] == 8
  assert set(result['dtypes']) == {'float32', 'bfloat16'}
  fp32_flops = summary.forward_flops(unet.UNet(width=4), (32, 32))
  bf16_flops = summary.forward_flops(unet.UNet(width=4, dtype=jnp.bfloat16), (32, 32))
  for dtype, entry in result['dtypes'].items():
    for key in ('train_images_per_s', 'predict_images_per_s', 'train_compile_s',
                'predict_compile_s', 'peak_memory_bytes', 'peak_flops'):
      assert math.isfinite(entry[key]) and entry[key] > 0, (dtype, key)
    assert entry['forward_flops_per_image'] == (fp32_flops if dtype == 'float32'
                                                else bf16_flops)
    assert entry['train_flops_per_image'] == 3 * entry['forward_flops_per_image']
    assert entry['train_flops_per_s'] == pytest.approx(
        entry['train_images_per_s'] * entry['train_flops_per_image'])
    assert entry['train_peak_fraction'] == pytest.approx(
        entry['train_flops_per_s'] / entry['peak_flops'])
    assert entry['peak_source'].startswith('estimate:')
  assert result['pipeline_images_per_s_per_core'] > 0


def test_torch_unet_has_the_same_parameter_count():
  torch = pytest.importorskip('torch')  # never a dependency; skipped where absent (CI)
  del torch
  from experiments.benchmarks import torch_unet  # pylint: disable=g-import-not-at-top
  for width in (4, 8):
    assert torch_unet.count_params(torch_unet.UNet(width=width)) == summary.count_params(
        unet.UNet(width=width))


def test_cpu_peak_estimate_reads_clock_and_vector_width(tmp_path, monkeypatch):
  monkeypatch.setattr(benchmark.os, 'cpu_count', lambda: 2)
  info = tmp_path / 'cpuinfo'
  info.write_text('processor\t: 0\ncpu MHz\t\t: 2200.000\nflags\t\t: fpu sse avx2 fma avx512f\n'
                  'processor\t: 1\ncpu MHz\t\t: 3000.000\nflags\t\t: fpu sse avx2 fma avx512f\n')
  peak, note = benchmark.cpu_peak_flops(str(info))
  assert peak == pytest.approx(2 * 2.2e9 * 64) and 'AVX-512' in note
  info.write_text('cpu MHz\t\t: 2500.000\nflags\t\t: fpu sse avx2 fma\n')
  assert benchmark.cpu_peak_flops(str(info))[0] == pytest.approx(2 * 2.5e9 * 32)
  assert benchmark.cpu_flop_per_cycle({'sse'}) == (8, 'SSE')


def test_conv_profile_covers_the_unet_forward_flops():
  """The profiled 3x3 convolutions, with their use counts, are the U-Net's forward FLOPs
  but for the 1->64 input convolution, the up-convolutions and the head (under 3%)."""
  from experiments.benchmarks import conv_profile  # pylint: disable=g-import-not-at-top
  assert conv_profile.conv_flops(16, 512, 1024) == 2 * 4 * 16 * 16 * 512 * 1024 * 9
  counted = sum(conv_profile.conv_flops(*s) * (2 if s in conv_profile.TWICE else 1)
                for s in conv_profile.SHAPES)
  total = conv_profile.BATCH * summary.forward_flops(unet.UNet(width=64), (256, 256))
  assert 0.97 * total < counted < total
