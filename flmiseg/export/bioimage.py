"""A bioimage.io model package (format 0.5) of a trained model: what `--mode=export` writes.

  rdf.yaml          the model description (bioimageio.spec's ModelDescr, validated on writing);
  weights.onnx      the ONNX graph (flmiseg/export/onnx_graph.py): normalised (B, Y, X, 1) float32 ->
                    probabilities (B, Y, X, C);
  test_input.npy,   a simulated image of the model's kind (flmiseg/data/simulate.py), raw, and
  test_output.npy   the output flmiseg's JAX model gives for it after the package's own
                    preprocessing: `bioimageio.core.test_model` reruns it with the ONNX weights
                    and compares;
  sample_input.tif, the same image and output as TIFF, for people and viewers;
  sample_output.tif
  cover.png         that image and the contour of its mask;
  README.md         the documentation: the model, its preprocessing (and what the spec cannot
                    express), sizes, threshold, how to run it, validation, citation;
  LICENSE.txt       the licence text (MIT; other licences by their SPDX id only).

Preprocessing in the spec (`preprocessing_steps`): 'percentile' is scale_range (1st and 99.8th
percentile per image, not clipped) and 'zscore' is zero_mean_unit_variance: the same as flmiseg
up to the spec's epsilon. CLAHE ('auto', 'clahe_*', 'reference_clahe_*') has no spec step: the
package gets the closest expressible step (the same robust stretch onto [0, 1], or the same
standardisation, without the local contrast equalisation), the README says so, and export
warns in one line;
such a package segments less well than flmiseg itself. A model trained with
--config.data.normalization=percentile exports without loss.
Postprocessing: a one-channel model's output is binarized at the calibrated threshold (else
config.eval.threshold) into a 0/1 uint8 mask; a model with an instance head keeps both
probability channels, and the threshold is in the README and under config.flmiseg.
"""

import datetime
import json
import pathlib
import tempfile

from absl import logging
import cv2
import numpy as np
import pydantic
import tifffile

from flmiseg.evaluation import calibration
from flmiseg.export import onnx_graph
from flmiseg.cli import predict
from flmiseg.store import pretrained
from flmiseg.data import preprocess
from flmiseg.data import simulate
from flmiseg.core.errors import UserError

PAPER = ('Guo, Y., Huang, J., Zhou, Y., Luo, Y., Li, W., Yang, G.: Segmentation of '
         'Intracellular Structures in Fluorescence Microscopy Images by Fusing Low-Level '
         'Features. In: Pattern Recognition and Computer Vision (PRCV 2021), Lecture Notes in '
         'Computer Science, vol. 13021, Springer (2021)')
PAPER_DOI = '10.1007/978-3-030-88010-1_32'
DEFAULT_AUTHORS = 'flmiseg contributors'
STRUCTURES = {'er': 'endoplasmic reticulum', 'mito': 'mitochondria', 'nucleus': 'nuclei'}
TAGS = {'er': 'endoplasmic-reticulum', 'mito': 'mitochondria', 'nucleus': 'nuclei'}
EPS = 1e-6  # the spec's epsilon of scale_range and zero_mean_unit_variance
MIT_LICENSE = """MIT License

Copyright (c) {year} {holders}

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""


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
  left = cv2.cvtColor(predict.display_image(raw), cv2.COLOR_GRAY2BGR)
  right = predict.overlay(raw, prob > threshold)
  both = np.concatenate([left, right], axis=1)
  scale = max(1, -(-256 // both.shape[0]))
  return cv2.resize(both, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)


# ----------------------------------------------------------------------------- text

def authors(config) -> list[str]:
  names = [n.strip() for n in str(config.get('authors', '') or '').split(',') if n.strip()]
  return names or [DEFAULT_AUTHORS]


def model_name(config) -> str:
  structure = STRUCTURES.get(config.data.kind, config.data.kind)
  return f'flmiseg {config.model.name} ({config.model.variant}) {structure}'[:64]


def validation_text(workdir) -> str:
  """The run's test metrics (eval/summary.json) or a packed model's recorded ones."""
  workdir = pathlib.Path(workdir)
  summary = workdir / 'eval' / 'summary.json'
  lines = []
  if summary.is_file():
    result = json.loads(summary.read_text())
    lines.append(f'flmiseg\'s test set ({result.get("num_images")} images): mean IoU '
                 f'{result.get("iou", float("nan")):.3f}, F1 {result.get("f1", float("nan")):.3f}'
                 f' at threshold {result.get("threshold")}')
    tuned = result.get('calibrated')
    if tuned:
      lines.append(f'At the calibrated threshold {tuned["threshold"]:.3f}: mean IoU '
                   f'{tuned.get("iou", float("nan")):.3f}.')
  elif pretrained.is_packed(workdir):
    info = json.loads((workdir / pretrained.WEIGHTS_INFO).read_text())
    scores = {k: v for k, v in info.items() if k.startswith('test_iou')}
    if scores:
      lines.append('Recorded with the packed model: ' + ', '.join(
          f'{k} {v:.3f}' for k, v in sorted(scores.items())) + '.')
  if not lines:
    lines.append('No test metrics were recorded with this model.')
  lines.append('To validate it on your own annotated images, run flmiseg\'s '
               '`--mode=eval` on the original run, or compare the masks this package gives '
               'with your annotations (IoU per image).')
  return '\n'.join(lines)


def readme(config, workdir, layout, step: int, threshold: float, source: str,
           steps, exact: bool) -> str:
  """README.md of the package."""
  data, model = config.data, config.model
  structure = STRUCTURES.get(data.kind, data.kind)
  sizes = (f'any height and width that are multiples of {layout.multiple} (the tools pad '
           'other sizes)' if layout.dynamic else
           f'tiles of exactly {layout.tile}x{layout.tile} pixels (the tools cut larger images '
           'into tiles)')
  limitation = '' if exact else (
      f'\n**Limitation.** flmiseg trained this model on images normalised with '
      f'`{preprocess.resolve(data.normalization, data.kind)}` (CLAHE, local contrast '
      'equalisation), which the bioimage.io spec cannot express. The package uses the closest '
      'step it can express (the same percentile stretch or standardisation, without the '
      'local equalisation), so it segments less well than `flmiseg` itself on the same '
      'image. For a lossless package, train with `--config.data.normalization=percentile`.\n')
  heads = ('channel 0 the foreground probability, channel 1 the instance head\'s normalised '
           'distance (flmiseg splits touching objects with it); the output is not binarized: '
           f'threshold channel 0 at {threshold:.3f}' if layout.channels > 1 else
           f'a 0/1 mask: the foreground probability binarized at {threshold:.3f}')
  pixel = (f'{data.pixel_size:g} um per pixel' if data.pixel_size else 'not recorded')
  return f"""# {model_name(config)}

Segmentation of {structure} in 2-D fluorescence microscopy images, exported by flmiseg, a
JAX/Flax reimplementation and extension of the method of Guo et al. (PRCV 2021; reference code
github.com/cbmi-group/icss-segmentation): general-purpose networks segment intracellular
structures much better when low-level, full-resolution features are fused into the decoder.

## Model

- Architecture: `{model.name}`, variant `{model.variant}`, width {model.width}; checkpoint
  step {step}.
- Input `raw`: one channel, axes (batch, y, x, channel), {sizes}, batch
  {layout.batch or 'of any size'}; training pixel size: {pixel}.
- Output: {heads} ({source} threshold).

## Preprocessing

The package normalises each image with: {describe_steps(steps)}.
{limitation}
## Training

{_training_text(config)}

## Validation

{validation_text(workdir)}

## Use

- **Fiji / deepImageJ**: install the package (the .zip of this folder, or this folder) with
  deepImageJ's "Install model", then run it on a single-channel image.
- **Python**: `bioimageio.core` runs it (`bioimageio predict` on the command line, or
  `bioimageio.core.predict` in Python), tiling large images; any ONNX runtime runs
  `weights.onnx` on preprocessed NHWC float32 tiles.
- **flmiseg** itself: `python -m flmiseg.main --mode=predict --workdir=<the run>` gives the
  exact training preprocessing and Gaussian-blended tiles.

## Citation

{PAPER}. https://doi.org/{PAPER_DOI}

## License

{licence(config)}; authors: {', '.join(authors(config))}.
"""


def _training_text(config) -> str:
  data, train = config.data, config.train
  if data.source == 'synthetic':
    where = (f'{data.num_synthetic_train} simulated {data.kind} images of '
             f'{data.synthetic_size}x{data.synthetic_size} (flmiseg\'s simulator, microscope '
             f'knobs `{data.get("synthetic_params", "default")}`, masks drawn '
             f'`{data.get("synthetic_masks", "geometry")}`)')
  else:
    where = 'the user\'s own annotated images (a list of image/mask pairs)'
  steps = f'{train.num_steps} steps' if train.num_steps else f'{train.num_epochs} epochs'
  return (f'Trained by flmiseg on {where}: {data.crop_size}x{data.crop_size} crops, batch '
          f'{train.batch_size}, {steps}, loss `{train.loss}`, optimiser `{config.optim.name}` '
          f'(learning rate {config.optim.lr:g}).')


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


def licence(config) -> str:
  return config.get('license', 'MIT') or 'MIT'


def check_metadata(config) -> None:
  """Raises UserError when config.license is not an SPDX licence the spec knows, before
  anything is converted."""
  from bioimageio.spec.model import v0_5  # pylint: disable=g-import-not-at-top
  try:
    v0_5.LicenseId(licence(config))
  except (ValueError, pydantic.ValidationError) as e:
    raise UserError(f'config.license={licence(config)!r} is not an SPDX licence identifier '
                    'bioimage.io knows (e.g. MIT, Apache-2.0, CC-BY-4.0)') from e


def describe(config, folder: pathlib.Path, layout, step: int, threshold: float, source: str):
  """The ModelDescr of the files in `folder` (validated by bioimageio.spec)."""
  from bioimageio.spec.model import v0_5  # pylint: disable=g-import-not-at-top
  _, exact = preprocessing_steps(config)
  structure = STRUCTURES.get(config.data.kind, config.data.kind)
  raw, output = _tensors(config, folder, layout, threshold)
  return v0_5.ModelDescr(
      name=model_name(config),
      description=(f'Segments {structure} in 2-D fluorescence microscopy images '
                   f'({config.model.name}/{config.model.variant}, trained with flmiseg).'),
      authors=[v0_5.Author(name=n) for n in authors(config)],
      cite=[v0_5.CiteEntry(text=PAPER, doi=v0_5.Doi(PAPER_DOI))],
      license=v0_5.LicenseId(licence(config)),
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


def write(config, workdir, out: pathlib.Path, probs_fn, model_bytes: bytes, layout,
          step: int) -> dict:
  """Writes the package of the model in `workdir` (probabilities `probs_fn`, its ONNX graph
  `model_bytes` of `layout`; export.py) into the new or empty folder `out`."""
  # pylint: disable=g-import-not-at-top
  from bioimageio.spec import save_bioimageio_package_as_folder
  steps, exact = preprocessing_steps(config)
  warnings = []
  if not exact:
    method = preprocess.resolve(config.data.normalization, config.data.kind)
    warnings.append(f'{workdir}: normalisation {method!r} (CLAHE) cannot be expressed in a '
                    f'bioimage.io package; it uses {describe_steps(steps)} instead, so it '
                    'segments less well than flmiseg (README.md says so); train with '
                    '--config.data.normalization=percentile for a lossless export')
    logging.warning('%s', warnings[-1])
  threshold = calibration.calibrated_threshold(workdir, step)
  source = 'calibrated'
  if threshold is None:
    threshold, source = float(config.eval.threshold), 'config.eval.threshold'
  raw, output, prob = test_tensors(config, probs_fn, layout, threshold)
  with tempfile.TemporaryDirectory() as tmp:
    folder = pathlib.Path(tmp)
    (folder / 'weights.onnx').write_bytes(model_bytes)
    np.save(folder / 'test_input.npy', raw)
    np.save(folder / 'test_output.npy', output)
    cv2.imwrite(str(folder / 'cover.png'), cover(raw[0, ..., 0], prob, threshold))
    (folder / 'README.md').write_text(
        readme(config, workdir, layout, step, threshold, source, steps, exact))
    if licence(config) == 'MIT':
      (folder / 'LICENSE.txt').write_text(MIT_LICENSE.format(
          year=datetime.date.today().year, holders=', '.join(authors(config))))
    tifffile.imwrite(folder / 'sample_input.tif', raw[0, ..., 0])
    tifffile.imwrite(folder / 'sample_output.tif', np.moveaxis(output[0], -1, 0))
    try:
      descr = describe(config, folder, layout, step, threshold, source)
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
  return {'output': str(out), 'layout': layout, 'step': step, 'threshold': threshold,
          'warnings': warnings}
