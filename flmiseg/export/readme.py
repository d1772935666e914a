"""The words of an exported package (flmiseg/export/bioimage.py): its README.md, name,
authors, licence and citation, from the model's config and recorded metrics."""

import json
import pathlib

from flmiseg.data import preprocess
from flmiseg.store import pretrained

PAPER = ('Guo, Y., Huang, J., Zhou, Y., Luo, Y., Li, W., Yang, G.: Segmentation of '
         'Intracellular Structures in Fluorescence Microscopy Images by Fusing Low-Level '
         'Features. In: Pattern Recognition and Computer Vision (PRCV 2021), Lecture Notes in '
         'Computer Science, vol. 13021, Springer (2021)')
PAPER_DOI = '10.1007/978-3-030-88010-1_32'
DEFAULT_AUTHORS = 'flmiseg contributors'
STRUCTURES = {'er': 'endoplasmic reticulum', 'mito': 'mitochondria', 'nucleus': 'nuclei'}
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


def licence(config) -> str:
  return config.get('license', 'MIT') or 'MIT'


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
           preprocessing: str, exact: bool) -> str:
  """README.md of the package; `preprocessing` describes its preprocessing steps, `exact`
  whether they equal flmiseg's."""
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

The package normalises each image with: {preprocessing}.
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
    listed = data.get('train_list', '')
    where = ('annotated images' + (f' (`{listed}`, image/mask pairs)' if listed else ''))
    fraction = data.get('synthetic_fraction', 0.0)
    if fraction:
      where += (f', each draw a simulated {data.kind} image of the simulator\'s '
                f'`{data.get("synthetic_params", "default")}` knobs with probability '
                f'{fraction:g}')
  steps = f'{train.num_steps} steps' if train.num_steps else f'{train.num_epochs} epochs'
  return (f'Trained by flmiseg on {where}: {data.crop_size}x{data.crop_size} crops, batch '
          f'{train.batch_size}, {steps}, loss `{train.loss}`, optimiser `{config.optim.name}` '
          f'(learning rate {config.optim.lr:g}).')
