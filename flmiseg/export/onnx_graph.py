"""A trained model as an ONNX graph, converted, checked and cached.

The graph maps a normalised NHWC float32 batch (B, H, W, 1) to the model's probabilities
(B, H, W, C), the sigmoid inside the graph: channel 0 the foreground, channel 1 the instance
head's distance (models with one). It computes in float32 with the weights of the best
checkpoint (or of the packed model), whatever config.train.dtype trained them.

The batch axis is dynamic. The spatial axes are dynamic where jax2onnx can trace the model with
symbolic sizes: then H and W may be any multiple of `Layout.multiple` (16 for the U-Net);
otherwise (segnet, hrnetv2, deeplabv3p, ...) they are fixed at one tile, --tile or else
config.data.crop_size, and tools cut larger images into such tiles. Each candidate `Layout`
is converted with jax2onnx and run once with ONNX Runtime on a probe batch; the first whose
outputs agree with JAX's is kept, so a graph that converts but computes something else is never
written.

`cached_onnx` converts a run once and keeps the graph in RUN/export/ (a packed model inside the
installed package: in the user's cache folder), named by a digest of the config and the
checkpoint, so a newer checkpoint converts again: the ONNX Runtime backend of predict and eval
(flmiseg/export/onnx_backend.py) reads it from there. `--mode=export`, the bioimage.io package
around the graph: flmiseg/export/bioimage.py.

jax2onnx, onnx, onnxruntime and bioimageio.spec are the optional extra `flmiseg[export]`;
they are imported only here and there, and a missing one is a one-line UserError.
"""

import contextlib
import dataclasses
import hashlib
import importlib
import io
import json
import logging as py_logging
import os
import pathlib

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from flmiseg import models
from flmiseg.core import files
from flmiseg.core.errors import UserError
from flmiseg.inference import model as model_lib
from flmiseg.store import checkpoint
from flmiseg.store import pretrained

INSTALL_HINT = 'pip install "flmiseg[export]"'
OPSET = 18  # ONNX Runtime >= 1.14 (2023); jax2onnx's lowerings of ReduceMean need >= 18
# Candidate spatial multiples for dynamic H and W, smallest first (the models' total strides).
SPATIAL_MULTIPLES = (16, 32, 64)
# Largest difference between ONNX Runtime's and JAX's probabilities on the probe batch (random
# normal inputs) for a conversion to count as correct: float rounding stays far below it (the
# U-Net: < 1e-6; an untrained DeepLabv3+ lowlevel, whose activations grow large: 4e-4), a
# wrongly converted operation far above it.
PROBE_TOLERANCE = 1e-3
EXPORT_DIR = 'export'  # RUN/export/: the cached graphs
# Bumped when the graph flmiseg writes changes, so caches made before convert again.
GRAPH_VERSION = 1
CONVERTER_LOGGERS = ('jax2onnx', 'onnx_ir', 'onnxscript')


def require(*modules: str, purpose: str = '--mode=export') -> None:
  """Raises a one-line UserError naming the first of `modules` that cannot be imported."""
  for name in modules:
    try:
      importlib.import_module(name)
    except ImportError as e:
      raise UserError(f'{purpose} needs the optional export extra ({name} is not installed: '
                      f'{" ".join(str(e).split())}); install it with: {INSTALL_HINT}') from e


@dataclasses.dataclass(frozen=True)
class Layout:
  """The input sizes an ONNX graph takes: H and W any positive multiple of `multiple`
  (dynamic; `tile` 0), or both equal to `tile` (fixed); a batch of any size (`batch` 0) or of
  exactly `batch`. `channels`: the output channels."""
  multiple: int = 0
  tile: int = 0
  batch: int = 0
  channels: int = 1

  @property
  def dynamic(self) -> bool:
    return self.multiple > 0

  def describe(self) -> str:
    size = (f'height and width any multiple of {self.multiple}' if self.dynamic else
            f'fixed {self.tile}x{self.tile} tiles')
    return f'{size}, {"any batch size" if not self.batch else f"batch of {self.batch}"}'

  def input_shape(self) -> tuple:
    """The shape jax2onnx traces: symbolic names for the dynamic axes."""
    h, w = ((f'{self.multiple}*h', f'{self.multiple}*w') if self.dynamic else
            (self.tile, self.tile))
    return (self.batch or 'batch', h, w, 1)

  def probe_shape(self) -> tuple[int, int, int, int]:
    """A small input that exercises the layout (non-square where sizes are free)."""
    h, w = (2 * self.multiple, 3 * self.multiple) if self.dynamic else (self.tile, self.tile)
    return (self.batch or 2, h, w, 1)


def candidate_layouts(tile: int) -> list[Layout]:
  """Layouts to try, best first: dynamic sizes, then fixed tiles (dynamic batch, then 1)."""
  return ([Layout(multiple=m) for m in SPATIAL_MULTIPLES] +
          [Layout(tile=tile), Layout(tile=tile, batch=1)])


# ----------------------------------------------------------------------------- the model

def forward(model):
  """probs: a float32 NHWC batch -> the float32 probabilities (N, H, W, C) of a loaded `model`
  (inference.model.Model), computed in float32 whatever config.train.dtype trained it."""
  variables = jax.tree.map(lambda a: np.asarray(a, np.float32),
                           jax.device_get(model.variables))
  network = models.create_model(model.config.model, jnp.float32)

  def probs(x):
    logits, _ = network.apply(variables, x, train=False)
    return jax.nn.sigmoid(logits.astype(jnp.float32))
  return probs


def _pooled_size(length, window: int, stride: int, padding: str):
  """The output size of a max-pool with 'SAME' or 'VALID' padding, for ints and symbolic
  sizes alike."""
  if padding.upper() == 'SAME':
    return -(-length // stride)
  return (length - window) // stride + 1


@contextlib.contextmanager
def _symbolic_pooling():
  """jax2onnx 0.12.5 substitutes nn.max_pool by its own primitive, whose shape rule returns a
  symbolic size unchanged (a 2x2 pool of H then reports H, and the U-Net's skip concatenation
  fails): this gives it the real output size while a conversion runs."""
  from jax2onnx.plugins.flax.linen import max_pool  # pylint: disable=g-import-not-at-top
  plugin = max_pool.MaxPoolPlugin
  original = plugin.__dict__['_compute_output_dim']

  def output_dim(length, window, stride, padding: str):
    if isinstance(length, (int, np.integer)) or padding.upper() not in ('SAME', 'VALID'):
      return original.__func__(length, window, stride, padding)
    return _pooled_size(length, window, stride, padding)
  plugin._compute_output_dim = staticmethod(output_dim)  # pylint: disable=protected-access
  try:
    yield
  finally:
    plugin._compute_output_dim = original  # pylint: disable=protected-access


@contextlib.contextmanager
def _quiet_converter():
  """Keeps jax2onnx's chatter off the console: its Conv plugin print()s debugging lines, and
  it logs warnings (with tracebacks: plugins for libraries of other versions it skips)."""
  loggers = [py_logging.getLogger(name) for name in CONVERTER_LOGGERS]
  levels = [logger.level for logger in loggers]
  for logger in loggers:
    logger.setLevel(py_logging.ERROR)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    for logger, level in zip(loggers, levels):
      logger.setLevel(level)


def convert(probs, layout: Layout):
  """The onnx.ModelProto of `probs` for `layout`: input 'input', output 'output', named
  dynamic axes (batch, height, width)."""
  with _quiet_converter():
    import jax2onnx  # pylint: disable=g-import-not-at-top
  with _symbolic_pooling(), _quiet_converter():
    proto = jax2onnx.to_onnx(probs, [layout.input_shape()], model_name='flmiseg',
                             opset=OPSET, input_names=['input'], output_names=['output'])
  # jax2onnx stamps some intermediate shapes wrongly (a symbolic size as a number); ONNX
  # Runtime infers them itself.
  del proto.graph.value_info[:]
  for value in list(proto.graph.input) + list(proto.graph.output):
    dims = value.type.tensor_type.shape.dim
    for dim, name in zip(dims, ('batch', 'height', 'width')):
      if not dim.HasField('dim_value'):
        dim.dim_param = name
  proto.producer_name = 'flmiseg'
  return proto


def session(model):
  """An ONNX Runtime CPU session of a serialised graph (bytes) or of a .onnx file (its path)."""
  import onnxruntime  # pylint: disable=g-import-not-at-top
  options = onnxruntime.SessionOptions()
  options.log_severity_level = 3  # errors only: shape-merge notes are not the user's
  return onnxruntime.InferenceSession(model, options,
                                      providers=['CPUExecutionProvider'])


def check(model_bytes: bytes, probs, layout: Layout) -> int:
  """Runs the graph on a probe batch; returns its output channels, or raises ValueError when
  its outputs differ from `probs`' by more than PROBE_TOLERANCE."""
  x = np.random.default_rng(0).normal(size=layout.probe_shape()).astype(np.float32)
  got = session(model_bytes).run(None, {'input': x})[0]
  want = np.asarray(probs(x))
  if got.shape != want.shape:
    raise ValueError(f'ONNX output shape {got.shape}, JAX {want.shape}')
  error = float(np.abs(got - want).max())
  if not error <= PROBE_TOLERANCE:
    raise ValueError(f'ONNX and JAX outputs differ by up to {error:.2g}')
  return got.shape[-1]


def to_onnx(model, tile: int = 0) -> tuple[bytes, Layout]:
  """(serialised ONNX graph, its Layout) of a loaded `model` (`forward`,
  `convert_checked`)."""
  require('jax2onnx', 'onnx', 'onnxruntime', purpose='ONNX conversion')
  return convert_checked(forward(model), model.config, model.folder, tile)


def convert_checked(probs, config, workdir, tile: int = 0) -> tuple[bytes, Layout]:
  """(serialised ONNX graph, its Layout) of `probs` (`forward`): the first of
  `candidate_layouts` (fixed tiles of `tile`, else config.data.crop_size) that converts and
  agrees with JAX (`check`); raises UserError when none does."""
  failures = []
  for layout in candidate_layouts(tile or config.data.crop_size):
    try:
      model_bytes = convert(probs, layout).SerializeToString()
      channels = check(model_bytes, probs, layout)
    except Exception as e:  # pylint: disable=broad-except  # jax2onnx/ORT raise many types.
      reason = ' '.join(str(e).split())[:160]
      logging.info('ONNX conversion with %s failed: %s: %s', layout.describe(),
                   type(e).__name__, reason)
      failures.append(f'{layout.describe()}: {type(e).__name__}: {reason}')
      continue
    return model_bytes, dataclasses.replace(layout, channels=channels)
  raise UserError(f'{workdir}: jax2onnx cannot convert this {config.model.name}/'
                  f'{config.model.variant} model to ONNX ({failures[-1]})')


# ----------------------------------------------------------------------------- the cache

def checkpoint_id(workdir) -> tuple[int, str]:
  """(step, identity) of the weights inference would load from `workdir`, without loading
  them: a packed model's SHA-256, or a run's best checkpoint step."""
  workdir = pathlib.Path(workdir)
  if pretrained.is_packed(workdir):
    info = json.loads((workdir / pretrained.WEIGHTS_INFO).read_text())
    return int(info.get('step', 0)), str(info.get('sha256', ''))
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  try:
    step = ckpt.best_step()
  finally:
    ckpt.close()
  if step is None:
    raise UserError(f'{workdir}: no trained checkpoint (train first with --mode=train)')
  return step, f'step{step}'


def cache_dir(workdir) -> pathlib.Path:
  """RUN/export/, or for a model inside the installed package (or a folder this user cannot
  write) a folder of the user's cache (FLMISEG_CACHE, else ~/.cache/flmiseg) named by it."""
  from flmiseg.data import loader  # pylint: disable=g-import-not-at-top
  workdir = pathlib.Path(workdir).resolve()
  inside_package = workdir.is_relative_to(pretrained.PRETRAINED_DIR.resolve())
  if not inside_package and os.access(workdir, os.W_OK):
    return workdir / EXPORT_DIR
  digest = hashlib.sha256(str(workdir).encode()).hexdigest()[:16]
  return loader.default_cache_root() / 'onnx' / f'{workdir.name}-{digest}'


def cache_key(config, workdir) -> tuple[str, int]:
  """(digest of what the graph depends on, checkpoint step)."""
  step, identity = checkpoint_id(workdir)
  model = json.dumps(json.loads(config.model.to_json()), sort_keys=True)
  text = '|'.join([model, identity, str(GRAPH_VERSION), str(OPSET)])
  return hashlib.sha256(text.encode()).hexdigest()[:12], step


def cached_onnx(config, workdir, tile: int = 0,
                model=None) -> tuple[pathlib.Path, Layout, int]:
  """(path of the ONNX graph of `workdir`'s model, its Layout, checkpoint step): converted on
  first use and kept (`cache_dir`); a graph of fixed tiles is kept per tile size. `model`: the
  model already loaded (inference.model.Model), else it is loaded for a conversion."""
  tile = tile or config.data.crop_size
  folder = cache_dir(workdir)
  digest, step = cache_key(config, workdir)
  for name in (f'model_{digest}_any', f'model_{digest}_{tile}'):
    graph, info = folder / f'{name}.onnx', folder / f'{name}.json'
    if graph.is_file() and info.is_file():
      try:
        return graph, Layout(**json.loads(info.read_text())), step
      except (OSError, ValueError, TypeError) as e:  # damaged: convert again
        logging.info('Ignoring the cached %s (%s)', info, e)
  if model is None:
    model = model_lib.Model(workdir, config, devices=jax.local_devices()[:1])
  model_bytes, layout = to_onnx(model, tile)
  name = f'model_{digest}_{"any" if layout.dynamic else tile}'
  try:
    folder.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise UserError(f'{folder}: cannot create it for the ONNX graph ({e.strerror})') from e
  for old in folder.glob('model_*'):  # graphs of earlier checkpoints
    if not old.name.startswith(f'model_{digest}_'):
      old.unlink(missing_ok=True)
  files.write_atomic(folder / f'{name}.onnx', lambda tmp: tmp.write_bytes(model_bytes))
  files.write_json_atomic(folder / f'{name}.json', dataclasses.asdict(layout))
  logging.info('Converted %s to ONNX (%s): %s', workdir, layout.describe(),
               folder / f'{name}.onnx')
  return folder / f'{name}.onnx', layout, step
