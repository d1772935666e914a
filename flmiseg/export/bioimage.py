"""A bioimage.io model package (format 0.5) of a trained model: what `--mode=export` writes.

  python -m flmiseg.main --mode=export --workdir=RUN --output=DIR [--tile=N]
  python -m flmiseg.main --mode=export --model=nucleus --output=DIR

The model is loaded through flmiseg/inference/model.py, converted to ONNX
(flmiseg/export/onnx_graph.py), and written with:
  rdf.yaml          the model description (bioimageio.spec's ModelDescr, validated on writing);
  weights.onnx      the ONNX graph (flmiseg/export/onnx_graph.py): normalised (B, Y, X, 1)
                    float32 -> probabilities (B, Y, X, C);
  test_input.npy,   a simulated image of the model's kind (flmiseg/data/simulate.py), raw, and
  test_output.npy   the output flmiseg's JAX model gives for it after the package's own
                    preprocessing: `bioimageio.core.test_model` reruns it with the ONNX weights
                    and compares;
  sample_input.tif, the same image and output as TIFF, for people and viewers;
  sample_output.tif
  cover.png         that image and the contour of its mask;
  README.md         the documentation: the model, its preprocessing (and what the spec cannot
                    express), sizes, threshold, how to run it, validation, citation
                    (flmiseg/export/readme.py);
  LICENSE.txt       the licence text (MIT; other licences by their SPDX id only).

Preprocessing in the spec (`preprocessing_steps`): 'percentile' is scale_range (1st and 99.8th
percentile per image, not clipped) and 'zscore' is zero_mean_unit_variance: the same as flmiseg
up to the spec's epsilon. CLAHE ('auto', 'clahe_*', 'reference_clahe_*') has no spec step: the
package gets the closest expressible step (the same robust stretch onto [0, 1], or the same
standardisation, without the local contrast equalisation), the README says so, and export
warns in one line;
such a package segments less well than flmiseg itself. A model trained with
--config.data.normalization=percentile exports without loss.
Postprocessing: a one-channel model's output is binarized at the model's threshold (calibrated,
else config.eval.threshold: flmiseg/store/settings.py) into a 0/1 uint8 mask; a model with an
instance head keeps both probability channels, and the threshold is in the README and under
config.flmiseg.
"""

import dataclasses
import datetime
import pathlib
import tempfile

from absl import logging
import cv2
import jax
import numpy as np
import pydantic
import tifffile

from flmiseg.core.errors import UserError
from flmiseg.data import preprocess
from flmiseg.data import simulate
from flmiseg.export import onnx_graph
from flmiseg.export import readme
from flmiseg.inference import model as model_lib
from flmiseg.inference import overlay
from flmiseg.inference import tiling

TAGS = {'er': 'endoplasmic-reticulum', 'mito': 'mitochondria', 'nucleus': 'nuclei'}
EPS = 1e-6  # the spec's epsilon of scale_range and zero_mean_unit_variance


# ----------------------------------------------------------------------------- preprocessing

# The package's preprocessing per normalisation method, as (step, arguments) pairs in the
# order they run, and whether it equals flmiseg's (False: CLAHE, which the spec lacks).
# At most one step takes statistics of the image: bioimageio.core computes every step's
# statistics on the raw image, before the first step runs, so a standardisation after the
# percentile stretch would use the raw image's mean and deviation.
_STRETCH = [('scale_range', (preprocess.LOW_PERCENTILE, preprocess.HIGH_PERCENTILE)),
            ('clip', (0.0, 1.0))]
_STANDARDISE = [('zero_mean_unit_variance', ())]
PREPROCESSING = {
    'percentile': (_STRETCH[:1], True),
    'zscore': (_STANDARDISE, True),
    'clahe_zscore': (_STANDARDISE, False),
    'clahe_unit': (_STRETCH, False),
    'reference_clahe_zscore': (_STANDARDISE, False),
    'reference_clahe_unit': (_STRETCH, False),
}


def preprocessing_steps(config) -> tuple[list, bool]:
  """(steps, exact) of the config's normalisation (PREPROCESSING; 'auto' by data.kind)."""
  method = preprocess.resolve(config.data.normalization, config.data.kind)
  return PREPROCESSING[method]


def apply_steps(image: np.ndarray, steps) -> np.ndarray:
  """float32 (H, W): the package's preprocessing of a raw image, computed as
  bioimageio.core computes it (per image; linear-interpolated percentiles; the spec's
  epsilon added to the divisor)."""
  x = np.asarray(image, np.float32)
  for name, args in steps:
    if name == 'scale_range':
      lo, hi = np.percentile(x, args).astype(np.float32)
      x = (x - lo) / (hi - lo + np.float32(EPS))
    elif name == 'clip':
      x = np.clip(x, *args)
    else:  # zero_mean_unit_variance
      x = (x - x.mean()) / (x.std() + np.float32(EPS))
  return x.astype(np.float32)


def spec_steps(steps):
  """bioimageio.spec descriptions of `steps` (per image: over the y and x axes)."""
  from bioimageio.spec.model import v0_5  # pylint: disable=g-import-not-at-top
  axes = [v0_5.AxisId('y'), v0_5.AxisId('x')]
  out = []
  for name, args in steps:
    if name == 'scale_range':
      out.append(v0_5.ScaleRangeDescr(kwargs=v0_5.ScaleRangeKwargs(
          axes=axes, min_percentile=args[0], max_percentile=args[1], eps=EPS)))
    elif name == 'clip':
      out.append(v0_5.ClipDescr(kwargs=v0_5.ClipKwargs(min=args[0], max=args[1])))
    else:
      out.append(v0_5.ZeroMeanUnitVarianceDescr(
          kwargs=v0_5.ZeroMeanUnitVarianceKwargs(axes=axes, eps=EPS)))
  return out


def describe_steps(steps) -> str:
  names = {'scale_range': 'scale_range (percentiles {} and {}, per image)',
           'clip': 'clip to [{}, {}]', 'zero_mean_unit_variance':
           'zero_mean_unit_variance (per image)'}
  return ', then '.join(names[n].format(*a) for n, a in steps)


# ----------------------------------------------------------------------------- test data

def test_image(config, layout: onnx_graph.Layout, seed: int = 0) -> np.ndarray:
  """A raw simulated image (H, W) of the model's kind, of a size the graph takes: the crop
  size rounded up to the layout's multiple (at least 64), or the fixed tile."""
  if layout.dynamic:
    side = max(64, config.data.crop_size)
    side = -(-side // layout.multiple) * layout.multiple
  else:
    side = layout.tile
  kind = config.data.kind if config.data.kind in simulate.KINDS else 'er'
  image, _ = simulate.simulate(kind, side, np.random.default_rng(seed))
  return image


def test_tensors(config, probs_fn, layout, threshold: float, tries: int = 4):
  """(raw input (1, H, W, 1) float32, expected output (1, H, W, C), probabilities (H, W))
  made by flmiseg's JAX model `probs_fn` (onnx_graph.forward) on the package's preprocessing of
  `test_image`: the first of `tries` images whose mask is not empty (the spec refuses an
  all-zero test output)."""
  steps, _ = preprocessing_steps(config)
  for seed in range(tries):
    raw = test_image(config, layout, seed).astype(np.float32)
    probs = np.asarray(probs_fn(apply_steps(raw, steps)[None, ..., None]))
    output = (probs > threshold).astype(np.uint8) if layout.channels == 1 else probs
    if output.max() > 0:
      break
  return raw[None, ..., None], output, probs[0, ..., 0]


def cover(raw: np.ndarray, prob: np.ndarray, threshold: float) -> np.ndarray:
  """BGR uint8 (H, 2W): the image, and the image with the mask's contour (at least 256
  pixels high)."""
  left = cv2.cvtColor(overlay.display_image(raw), cv2.COLOR_GRAY2BGR)
  right = overlay.overlay(raw, prob > threshold)
  both = np.concatenate([left, right], axis=1)
  scale = max(1, -(-256 // both.shape[0]))
  return cv2.resize(both, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)


# ----------------------------------------------------------------------------- text

# ----------------------------------------------------------------------------- the package

def _axes(layout, pixel_size: float, output: bool):
  """The (batch, y, x, channel) axes of the input or output tensor."""
  from bioimageio.spec.model import v0_5  # pylint: disable=g-import-not-at-top
  batch = v0_5.BatchAxis(size=layout.batch or None)
  space = {}
  if pixel_size:
    space = {'scale': pixel_size, 'unit': 'micrometer'}
  if output:
    names = ['foreground', 'distance'][:layout.channels]
    return [batch] + [v0_5.SpaceOutputAxis(id=v0_5.AxisId(a), size=v0_5.SizeReference(
        tensor_id=v0_5.TensorId('raw'), axis_id=v0_5.AxisId(a)), **space) for a in 'yx'] + [
            v0_5.ChannelAxis(channel_names=[v0_5.Identifier(n) for n in names])]
  size = (v0_5.ParameterizedSize(min=layout.multiple, step=layout.multiple)
          if layout.dynamic else layout.tile)
  return [batch] + [v0_5.SpaceInputAxis(id=v0_5.AxisId(a), size=size, **space)
                    for a in 'yx'] + [v0_5.ChannelAxis(channel_names=[v0_5.Identifier('raw')])]


def _tensors(config, folder: pathlib.Path, layout, threshold: float):
  """(input, output) tensor descriptions of the files in `folder`."""
  from bioimageio.spec.model import v0_5  # pylint: disable=g-import-not-at-top
  steps, _ = preprocessing_steps(config)
  if layout.channels == 1:
    postprocessing = [v0_5.BinarizeDescr(kwargs=v0_5.BinarizeKwargs(threshold=threshold)),
                      v0_5.EnsureDtypeDescr(kwargs=v0_5.EnsureDtypeKwargs(dtype='uint8'))]
    output_data = v0_5.NominalOrOrdinalDataDescr(values=[0, 1], type='uint8')
  else:
    postprocessing = []
    output_data = v0_5.IntervalOrRatioDataDescr(type='float32', range=(0.0, 1.0))
  raw = v0_5.InputTensorDescr(
      id=v0_5.TensorId('raw'), description='raw single-channel image',
      axes=_axes(layout, config.data.pixel_size, output=False),
      test_tensor=v0_5.FileDescr(source=folder / 'test_input.npy'),
      sample_tensor=v0_5.FileDescr(source=folder / 'sample_input.tif'),
      data=v0_5.IntervalOrRatioDataDescr(type='float32'), preprocessing=spec_steps(steps))
  output = v0_5.OutputTensorDescr(
      id=v0_5.TensorId('mask' if layout.channels == 1 else 'probabilities'),
      description=('foreground mask' if layout.channels == 1 else
                   'foreground probability and normalised distance'),
      axes=_axes(layout, config.data.pixel_size, output=True),
      test_tensor=v0_5.FileDescr(source=folder / 'test_output.npy'),
      sample_tensor=v0_5.FileDescr(source=folder / 'sample_output.tif'),
      data=output_data, postprocessing=postprocessing)
  return raw, output


def check_metadata(config) -> None:
  """Raises UserError when config.license is not an SPDX licence the spec knows, before
  anything is converted."""
  from bioimageio.spec.model import v0_5  # pylint: disable=g-import-not-at-top
  try:
    v0_5.LicenseId(readme.licence(config))
  except (ValueError, pydantic.ValidationError) as e:
    raise UserError(f'config.license={readme.licence(config)!r} is not an SPDX licence identifier '
                    'bioimage.io knows (e.g. MIT, Apache-2.0, CC-BY-4.0)') from e


def describe(config, folder: pathlib.Path, layout, step: int, threshold: float, source: str):
  """The ModelDescr of the files in `folder` (validated by bioimageio.spec)."""
  from bioimageio.spec.model import v0_5  # pylint: disable=g-import-not-at-top
  _, exact = preprocessing_steps(config)
  structure = readme.STRUCTURES.get(config.data.kind, config.data.kind)
  raw, output = _tensors(config, folder, layout, threshold)
  return v0_5.ModelDescr(
      name=readme.model_name(config),
      description=(f'Segments {structure} in 2-D fluorescence microscopy images '
                   f'({config.model.name}/{config.model.variant}, trained with flmiseg).'),
      authors=[v0_5.Author(name=n) for n in readme.authors(config)],
      cite=[v0_5.CiteEntry(text=readme.PAPER, doi=v0_5.Doi(readme.PAPER_DOI))],
      license=v0_5.LicenseId(readme.licence(config)),
      documentation=v0_5.FileDescr(source=folder / 'README.md'),
      covers=[v0_5.FileDescr(source=folder / 'cover.png')],
      attachments=([v0_5.FileDescr(source=folder / 'LICENSE.txt')]
                   if (folder / 'LICENSE.txt').is_file() else []),
      tags=['flmiseg', 'segmentation', 'semantic-segmentation', '2d',
            'fluorescence-light-microscopy', TAGS.get(config.data.kind, 'cells'), 'onnx',
            config.model.name.replace('_', '-')],
      inputs=[raw], outputs=[output],
      weights=v0_5.WeightsDescr(onnx=v0_5.OnnxWeightsDescr(
          source=folder / 'weights.onnx', opset_version=onnx_graph.OPSET)),
      config=v0_5.Config.model_validate({
          'bioimageio': {'architecture_type': config.model.name[:32],
                         'modality': 'fluorescence microscopy',
                         'target_structure': [structure], 'task': 'semantic segmentation'},
          'flmiseg': {'threshold': threshold, 'threshold_source': source,
                      'normalization': config.data.normalization, 'kind': config.data.kind,
                      'preprocessing_exact': exact, 'checkpoint_step': step,
                      'layout': layout.describe()}}),
  )


def _write_files(model, folder: pathlib.Path, probs_fn, model_bytes: bytes, layout,
                steps, exact: bool) -> None:
  """The package's files, but rdf.yaml, into `folder`."""
  config = model.config
  raw, output, prob = test_tensors(config, probs_fn, layout, model.threshold)
  (folder / 'weights.onnx').write_bytes(model_bytes)
  np.save(folder / 'test_input.npy', raw)
  np.save(folder / 'test_output.npy', output)
  cv2.imwrite(str(folder / 'cover.png'), cover(raw[0, ..., 0], prob, model.threshold))
  (folder / 'README.md').write_text(readme.readme(
      config, model.folder, layout, model.step, model.threshold, model.threshold_source,
      describe_steps(steps), exact))
  if readme.licence(config) == 'MIT':
    (folder / 'LICENSE.txt').write_text(readme.MIT_LICENSE.format(
        year=datetime.date.today().year, holders=', '.join(readme.authors(config))))
  tifffile.imwrite(folder / 'sample_input.tif', raw[0, ..., 0])
  tifffile.imwrite(folder / 'sample_output.tif', np.moveaxis(output[0], -1, 0))


def write(model, out: pathlib.Path, probs_fn, model_bytes: bytes, layout) -> dict:
  """Writes the package of a loaded `model` (inference.model.Model; probabilities
  `probs_fn`, its ONNX graph `model_bytes` of `layout`: onnx_graph.py) into the new or empty
  folder `out`, at the model's threshold."""
  # pylint: disable=g-import-not-at-top
  from bioimageio.spec import save_bioimageio_package_as_folder
  config = model.config
  steps, exact = preprocessing_steps(config)
  warnings = []
  if not exact:
    method = preprocess.resolve(config.data.normalization, config.data.kind)
    warnings.append(f'{model.folder}: normalisation {method!r} (CLAHE) cannot be expressed '
                    f'in a bioimage.io package; it uses {describe_steps(steps)} instead, so it '
                    'segments less well than flmiseg (README.md says so); train with '
                    '--config.data.normalization=percentile for a lossless export')
    logging.warning('%s', warnings[-1])
  with tempfile.TemporaryDirectory() as tmp:
    folder = pathlib.Path(tmp)
    _write_files(model, folder, probs_fn, model_bytes, layout, steps, exact)
    try:
      descr = describe(config, folder, layout, model.step, model.threshold,
                       model.threshold_source)
    except pydantic.ValidationError as e:
      error = e.errors()[0]
      where = '.'.join(str(part) for part in error['loc'])
      hint = {'license': ' (config.license: an SPDX identifier such as MIT)',
              'authors': ' (config.authors: comma-separated names)'}.get(
                  str(error['loc'][0]) if error['loc'] else '', '')
      raise UserError(f'the bioimage.io description is invalid at {where}: '
                      f'{" ".join(str(error["msg"]).split())}{hint}') from e
    out.mkdir(parents=True, exist_ok=True)
    save_bioimageio_package_as_folder(descr, output_path=out)
  return {'output': str(out), 'layout': layout, 'step': model.step,
          'threshold': model.threshold, 'warnings': warnings}


# ----------------------------------------------------------------------------- --mode=export

@dataclasses.dataclass(frozen=True)
class Options:
  """What --mode=export was asked to do."""
  output: str
  tile: int = 0  # 0: config.data.crop_size (for models whose graph takes fixed tiles),
  # rounded up to a multiple of 32 (tiling.network_tile)

  def check(self) -> pathlib.Path:
    """The output folder; raises UserError unless it is new or empty."""
    if not self.output:
      raise UserError('--output is required with --mode=export (a new or empty folder for '
                      'the package)')
    if self.tile and self.tile < 16:
      raise UserError(f'--tile={self.tile}: use at least 16 pixels')
    out = pathlib.Path(self.output)
    if out.exists() and not out.is_dir():
      raise UserError(f'--output={self.output} is a file, not a folder')
    if out.is_dir() and any(out.iterdir()):
      raise UserError(f'--output={self.output} is not empty; give a new or empty folder')
    return out


def run(config, workdir, options: Options) -> dict:
  """--mode=export: writes the bioimage.io package of the model in `workdir` (with `config`,
  main's) into options.output; returns {'output', 'layout', 'step', 'threshold',
  'warnings'}."""
  out = options.check()
  onnx_graph.require('jax2onnx', 'onnx', 'onnxruntime', 'bioimageio.spec')
  check_metadata(config)
  if note := tiling.tile_note(options.tile, config):
    logging.warning('%s', note)
  model = model_lib.Model(workdir, config, devices=jax.local_devices()[:1])
  probs = onnx_graph.forward(model)
  model_bytes, layout = onnx_graph.convert_checked(probs, config, workdir,
                                                   tiling.network_tile(options.tile, config))
  return write(model, out, probs, model_bytes, layout)
