"""ONNX Runtime as the inference backend of predict and eval: `--backend=onnx` (CPU).

The run's model is converted to ONNX once and kept in the run directory
(flmiseg/export/onnx_graph.py: `cached_onnx`; converted again when a newer checkpoint becomes
the best); everything around the network stays flmiseg's: the normalisation, the tiles and
their Gaussian blending (flmiseg/inference/tiling.py), TTA, thresholds, instances and the
metrics. So the masks are the JAX backend's up to float rounding (tests/test_export.py:
IoU >= 0.99).

`Runner` runs the graph on batches of any size: it pads H and W to the graph's multiple
(zeros at the bottom and right, as the models pad themselves) or checks the fixed tile, and
splits a batch for a graph of fixed batch size. `predictor` plugs it into the inference core
(flmiseg/inference/segment.py: `Predictor`) in place of the jitted JAX forward pass. Needs the
`flmiseg[export]` extra.
"""

import jax
import numpy as np

from flmiseg.core import sharding
from flmiseg.core.errors import UserError
from flmiseg.evaluation import metrics
from flmiseg.export import onnx_graph
from flmiseg.inference import segment
from flmiseg.inference import tiling


class Runner:
  """An ONNX graph (`onnx_graph.Layout`) as a function: float32 (N, h, w, 1) -> (N, h, w, C)."""

  def __init__(self, path, layout: onnx_graph.Layout):
    self.session = onnx_graph.session(str(path))
    self.layout = layout

  def __call__(self, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    n, h, w, _ = x.shape
    layout = self.layout
    if layout.dynamic:
      m = layout.multiple
      x = np.pad(x, ((0, 0), (0, -h % m), (0, -w % m), (0, 0)))
    elif (h, w) != (layout.tile, layout.tile):
      raise ValueError(f'the ONNX graph takes {layout.tile}x{layout.tile} tiles, not {h}x{w}')
    step = layout.batch or n
    outputs = [self.session.run(None, {'input': x[i:i + step]})[0] for i in range(0, n, step)]
    return np.concatenate(outputs)[:, :h, :w]


def prob_fn(runner: Runner, tta: bool):
  """`tiling.prob_fn` on ONNX Runtime: tiles (B, t, t, 1) -> outputs (B, t, t, C), with
  `tta` the mean over the 8 flips/rotations (all 8 views in one run)."""
  if not tta:
    return runner

  def averaged(tiles):
    views = runner(np.concatenate([tiling.dihedral(tiles, k, xp=np) for k in range(8)]))
    return sum(tiling.dihedral(v, k, inverse=True, xp=np)
               for k, v in enumerate(np.split(views, 8))) / np.float32(8)
  return averaged


def _runner(config, workdir, tile: int, model=None) -> Runner:
  """The Runner of the cached graph of the model in `workdir` (`onnx_graph.cached_onnx`;
  `model`, when loaded, converts it on a miss)."""
  onnx_graph.require('jax2onnx', 'onnx', 'onnxruntime', purpose='--backend=onnx')
  if jax.process_count() > 1:
    raise UserError('--backend=onnx runs in a single process; use --backend=jax with several')
  path, layout, _ = onnx_graph.cached_onnx(config, workdir, tile, model)
  return Runner(path, layout)


def predictor(model, settings: segment.Settings) -> segment.Predictor:
  """The inference core's Predictor of a loaded `model` (inference.model.Model) on ONNX
  Runtime, with `settings`' tile (`tiling.network_tile`), overlap, batch size (0:
  config.eval.batch_size) and TTA."""
  config = model.config
  tile = tiling.network_tile(settings.tile, config)
  runner = _runner(config, model.folder, tile, model)
  return segment.Predictor(prob_fn(runner, settings.tta), config, tile, settings.overlap,
                           settings.batch_size or config.eval.batch_size)


def predict_step(config, workdir, threshold: float):
  """A stand-in for the jitted `steps.predict_step` with `threshold` bound, for eval and
  calibration (flmiseg/evaluation/evaluate.py): predict(state, batch) -> (outputs
  (N, H, W, C), counts) of whole images; a graph of fixed tiles runs `tiling.sliding_window`
  over each."""
  runner = _runner(config, workdir, config.data.crop_size)
  layout = runner.layout

  def run(state, batch):
    del state  # the weights are in the graph
    host = sharding.to_host(batch)
    images = np.asarray(host['image'], np.float32)
    if layout.dynamic:
      probs = runner(images)
    else:
      probs = np.stack([tiling.sliding_window(runner, image[..., 0], layout.tile, 0.25,
                                              config.eval.batch_size) for image in images])
    counts = metrics.confusion_counts(probs[..., :1], host['mask'], threshold, host['valid'])
    return probs, jax.device_get(counts)
  return run
