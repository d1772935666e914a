"""grain input pipelines: training (seeded shuffle, augmentation, batching) and evaluation
(in order, padded last batch with a mask so every image counts exactly once).

Batches are host numpy dicts, NHWC:
  'image' float32 (B, H, W, 1), 'mask' float32 (B, H, W, 1) in {0, 1},
  'valid' float32 (B, H, W, 1): 1 on real pixels, 0 on padding;
eval batches also carry 'present' float32 (B,) (0 for padding entries) and 'index' int32 (B,).
Each process builds the batches of its own shard (process_index of process_count); one
boundary function (`flmiseg.core.sharding.global_batch`) turns them into global arrays.

Augmentation runs on the host (grain workers): a random crop to `crop_size` (images smaller
than the crop are zero-padded, with valid=0 there) and one of the 8 symmetries of the square
(the reference's flips and 90/180/270 rotations), the same for image and mask.

Optional robustness augmentation (`augment`, config.data.augment), so that models trained on
simulated images hold up on real microscopes. Groups (AUGMENT_GROUPS), each applied to a crop
with its probability below:
  scale         zoom by a factor in `scale_range` (config.data.scale_range, by default
                SCALE_RANGE) before cropping: image area/bilinear, mask and
                maps nearest neighbour, all from one resampling so they stay aligned;
  intensity     gamma on the crop's value range, contrast about its mean, an offset;
  illumination  a smooth random multiplicative field (of the signal above the crop minimum);
  blur          Gaussian blur of the image (never the mask);
  noise         signal-dependent (Poisson-like) and additive Gaussian noise;
  invert        (opt-in, not part of 'all') first of all, with probability INVERT_PROB, the
                crop becomes `mirror - crop`: with the normalisation's mirror point
                (flmiseg/data/preprocess.py: mirror_point) that is what the normalised
                inverted image looks like, bright objects on a dark background turned dark
                on bright, as nuclei look in brightfield and in the luminance of H&E images;
                so a model learns both contrasts. (No mirror point: about the middle of the
                crop's range.)
  dim           (opt-in) before the others, with probability DIM_PROB, each object of the
                crop (an 8-connected component of its mask) with probability DIM_SHARE
                keeps only a factor in `dim_range` (config.data.dim_range, by default
                DIM_RANGE) of its signal above the background (the median of the crop's
                unmasked pixels), with a soft edge so its blurred light dims too: dim nuclei
                beside bright ones, from real annotated images, as fluorescence shows them
                (DNA content, stain uptake, focus). The mask stays.
Amounts are relative to each crop's own statistics (min, max, mean, std of its real pixels),
so they mean the same under every normalisation. The cached images are normalised already,
so these emulate what per-image normalisation does not remove. Evaluation never augments.

Pixels a sparse mask leaves unlabelled (the source's 'ignored' map, config.data.ignore_value)
get valid=0 (and mask 0), so losses and metrics skip them. Elements with a 'distance' map (the
instance head's target, flmiseg/objects/instances.py) get it cropped, zoomed (nearest neighbour) and
turned with the mask, as float32 (B, H, W, 1) 'distance' in the training batches.
"""

import dataclasses
import math

import cv2
import grain
import numpy as np

from flmiseg.data import mixing


DIHEDRAL_ORDER = 8
AUGMENT_GROUPS = ('intensity', 'noise', 'blur', 'scale', 'illumination')
OPT_IN_GROUPS = ('invert', 'dim')  # named explicitly; 'all' leaves them out
PHOTOMETRIC_GROUPS = ('intensity', 'noise', 'blur', 'illumination', 'invert')  # values only
# Robustness augmentation strengths (see the module docstring). Ranges are sampled uniformly,
# factors log-uniformly (a zoom by 1/2 is as likely as by 2).
SCALE_PROB = 0.5
SCALE_RANGE = (0.7, 1.4)  # zoom factor
INTENSITY_PROB = 0.5  # for each of gamma, contrast and offset
GAMMA_RANGE = (0.6, 1.6)  # on the crop rescaled to [0, 1] by its min and max
CONTRAST_RANGE = (0.6, 1.5)  # factor on the deviation from the crop mean
OFFSET = 0.3  # +- this many crop standard deviations
ILLUMINATION_PROB = 0.5
ILLUMINATION = 0.3  # the field's largest deviation from 1: up to +-30%
ILLUMINATION_GRID = 4  # control points per side of the smooth field (bicubic in between)
BLUR_PROB = 0.25  # occasional: most real images are in focus
BLUR_SIGMA = 1.5  # largest Gaussian sigma, pixels
NOISE_PROB = 0.5  # for each of the two noises
POISSON_NOISE = 0.3  # largest signal-dependent sigma at the crop mean, in crop stds
GAUSSIAN_NOISE = 0.3  # largest additive sigma, in crop stds
INVERT_PROB = 0.3
DIM_PROB = 0.5  # share of crops whose objects may be dimmed
DIM_SHARE = 0.5  # each object of such a crop is dimmed with this probability
DIM_RANGE = (0.07, 0.7)  # its factor (config.data.dim_range): with bright ones, up to 14x
DIM_EDGE = 4  # px: the dimming fades over 2 * DIM_EDGE px past the mask (blurred light)


def parse_augment(spec: str) -> tuple[str, ...]:
  """The groups of a config.data.augment string ('' = none, 'all', or 'noise,blur', ...),
  in AUGMENT_GROUPS + OPT_IN_GROUPS order ('all': every AUGMENT_GROUPS one). Raises
  ValueError naming the setting for an unknown name."""
  valid = (f'valid: {", ".join(AUGMENT_GROUPS + OPT_IN_GROUPS)} or all (all but '
           f'{", ".join(OPT_IN_GROUPS)}), comma-separated (\'\' = off)')
  if not isinstance(spec, str):
    raise ValueError(f'config.data.augment={spec!r} is not a string; {valid}')
  names = [n.strip() for n in spec.split(',') if n.strip()]
  for name in names:
    if name not in AUGMENT_GROUPS + OPT_IN_GROUPS + ('all',):
      raise ValueError(f'config.data.augment={spec!r}: {name!r} is not an augmentation; '
                       f'{valid}')
  return tuple(g for g in AUGMENT_GROUPS if g in names or 'all' in names) + tuple(
      g for g in OPT_IN_GROUPS if g in names)


def dihedral(x: np.ndarray, k: int) -> np.ndarray:
  """Element k (0..7) of the dihedral group D4 on the first two axes of x.

  k % 4 quarter-turns counter-clockwise, then (k >= 4) a left-right flip.
  """
  x = np.rot90(x, k % 4, axes=(0, 1))
  return x[:, ::-1] if k >= 4 else x


def crop_or_pad(arrays: list[np.ndarray], size: int, top: int, left: int) -> list[np.ndarray]:
  """Crops each (H, W) array to (size, size) at (top, left), zero-padding what is outside."""
  out = []
  for a in arrays:
    h, w = a.shape
    window = np.zeros((size, size), a.dtype)
    ch, cw = min(size, h - top), min(size, w - left)
    window[:ch, :cw] = a[top:top + ch, left:left + cw]
    out.append(window)
  return out


def _log_uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
  return float(np.exp(rng.uniform(math.log(bounds[0]), math.log(bounds[1]))))


def _scaled_crop(arrays: list[np.ndarray], size: int, top: int, left: int,
                 rng: np.random.Generator,
                 scale_range: tuple[float, float] = SCALE_RANGE) -> list[np.ndarray]:
  """`crop_or_pad` of the arrays zoomed by a random factor in `scale_range` (log-uniform).

  Args:
    arrays: (H, W) arrays: the image (area-averaged when shrinking, bilinear when growing),
      then maps in {0, 1} (mask, valid, ...: nearest neighbour, so they stay binary).
    size: the crop side; a zoomed image smaller than it is zero-padded.
    top, left: the crop position drawn for the unzoomed image; it keeps its place as a
      fraction of the free range, refined by a new uniform draw, so crops stay uniformly
      placed over the zoomed image.

  Only the part of the image the crop needs is resampled (cheap on large images); every
  array goes through the same cv2.resize geometry (pixel centres), so they stay aligned.
  """
  h, w = arrays[0].shape
  factor = _log_uniform(rng, scale_range)
  windows = []
  for start, length, fraction in ((top, h, rng.random()), (left, w, rng.random())):
    zoomed = max(round(length * factor), 1)
    # (start + U) / n is uniform on [0, 1) when start is uniform on 0..n-1.
    at = int((start + fraction) / (max(length - size, 0) + 1) * (max(zoomed - size, 0) + 1))
    first = min(int(at / factor), length - 1)  # source row/column under zoomed `at`
    last = min(length, math.ceil((at + size) / factor) + 2)  # +2: interpolation margin
    windows.append((first, last, round(at - first * factor)))
  (r0, r1, dy), (c0, c1, dx) = windows
  image = np.ascontiguousarray(arrays[0][r0:r1, c0:c1])
  method = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
  out = [cv2.resize(image, None, fx=factor, fy=factor, interpolation=method)]
  for a in arrays[1:]:
    # INTER_NEAREST_EXACT samples at pixel centres as INTER_LINEAR/AREA do (INTER_NEAREST
    # is shifted by up to half a pixel).
    out.append(cv2.resize(np.ascontiguousarray(a[r0:r1, c0:c1]), None, fx=factor, fy=factor,
                          interpolation=cv2.INTER_NEAREST_EXACT))
  return crop_or_pad(out, size, dy, dx)


def _intensity(image: np.ndarray, stats: tuple[float, ...],
               rng: np.random.Generator) -> np.ndarray:
  """Random gamma, contrast and offset of a crop; stats = (min, max, mean, std)."""
  lo, hi, mean, std = stats
  if rng.random() < INTENSITY_PROB and hi > lo:
    gamma = _log_uniform(rng, GAMMA_RANGE)
    unit = np.clip((image - lo) / (hi - lo), 1e-12, 1.0)  # clip: rounding, log(0)
    image = lo + (hi - lo) * np.exp(gamma * np.log(unit))  # unit ** gamma, 6x faster
  if rng.random() < INTENSITY_PROB:
    image = mean + (image - mean) * _log_uniform(rng, CONTRAST_RANGE)
  if rng.random() < INTENSITY_PROB:
    image = image + rng.uniform(-OFFSET, OFFSET) * std
  return image


def _illumination(image: np.ndarray, lo: float, rng: np.random.Generator) -> np.ndarray:
  """Multiplies the signal above `lo` by a smooth random field within 1 +- ILLUMINATION."""
  grid = rng.uniform(-1.0, 1.0, (ILLUMINATION_GRID, ILLUMINATION_GRID)).astype(np.float32)
  # Bicubic to 32 x 32, then bilinear: as smooth, and 6x faster than bicubic to full size.
  coarse = cv2.resize(grid, (32, 32), interpolation=cv2.INTER_CUBIC)
  field = cv2.resize(coarse, image.shape[::-1], interpolation=cv2.INTER_LINEAR)
  field *= rng.uniform(0.0, ILLUMINATION) / max(float(np.abs(field).max()), 1e-6)
  # About the crop minimum (the background), not 0: z-scored images are negative there.
  return lo + (image - lo) * (1.0 + field)


def _noise(image: np.ndarray, stats: tuple[float, ...],
           rng: np.random.Generator) -> np.ndarray:
  """Signal-dependent (variance proportional to the intensity above the crop minimum) and
  additive Gaussian noise, each with probability NOISE_PROB."""
  lo, _, mean, std = stats
  gain = sigma = 0.0
  if rng.random() < NOISE_PROB:
    gain = (rng.uniform(0.0, POISSON_NOISE) * std) ** 2 / max(mean - lo, 1e-12)
  if rng.random() < NOISE_PROB:
    sigma = rng.uniform(0.0, GAUSSIAN_NOISE) * std
  if gain == 0.0 and sigma == 0.0:
    return image
  # Independent Gaussians add their variances: one draw serves both noises.
  spread = np.sqrt(gain * np.maximum(image - lo, 0.0) + sigma ** 2)
  return image + spread * _standard_normal(rng, image.shape)


def _standard_normal(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
  """float32 N(0, 1) samples by Box-Muller from float32 uniforms: 3x faster here than
  rng.standard_normal; the tails end near 5.8 sigma, plenty for augmentation."""
  size = math.prod(shape)
  u = rng.random((2, (size + 1) // 2), np.float32)
  radius = np.sqrt(-2.0 * np.log1p(-u[0]))  # u < 1: finite
  angle = np.float32(2 * np.pi) * u[1]
  return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:size].reshape(shape)


def dim_objects(image: np.ndarray, mask: np.ndarray, inside: np.ndarray,
                rng: np.random.Generator,
                dim_range: tuple[float, float] = DIM_RANGE) -> np.ndarray:
  """The 'dim' group on one (S, S) float32 crop: with probability DIM_PROB, every object
  (8-connected component of `mask` > 0) with probability DIM_SHARE gets a factor log-uniform
  in `dim_range` (`dimmed`); padding (`inside` False) keeps its values."""
  if rng.random() >= DIM_PROB:
    return image
  count, labels = cv2.connectedComponents((mask > 0).astype(np.uint8), connectivity=8)
  chosen = rng.random(count - 1) < DIM_SHARE
  factors = np.exp(rng.uniform(*np.log(dim_range), count - 1))
  return dimmed(image, labels, np.concatenate([[1.0], np.where(chosen, factors, 1.0)]), inside)


def dimmed(image: np.ndarray, labels: np.ndarray, factors: np.ndarray,
           inside: np.ndarray | None = None) -> np.ndarray:
  """float32 (H, W): each object k of the label image `labels` (0 background) keeps
  `factors[k]` of its signal, `background + factors[k] * (image - background)`, background
  the median of the real (`inside`; None: all) unlabelled pixels. The factor holds on the
  object and fades over the 2 * DIM_EDGE px past it (its blurred light); the other pixels and
  the padding keep their values. factors: (labels.max() + 1,), factors[0] unused."""
  inside = np.ones(image.shape, bool) if inside is None else inside
  outside = inside & (labels == 0)
  loss = 1.0 - np.asarray(factors, np.float32)
  loss[0] = 0.0
  if not loss.any() or not outside.any():
    return image.astype(np.float32, copy=False)
  side = 2 * DIM_EDGE + 1
  field = cv2.dilate(loss[labels], np.ones((side, side), np.uint8))  # grows each dimmed object
  # A Gaussian that reaches DIM_EDGE px (sigma half that): the object itself keeps its factor.
  field = cv2.GaussianBlur(field, (side, side), DIM_EDGE / 2,
                           borderType=cv2.BORDER_REFLECT_101)
  background = np.float32(np.median(image[outside]))
  out = image - (image - background) * field
  return np.where(inside, out, image).astype(np.float32, copy=False)


def photometric(image: np.ndarray, inside: np.ndarray, groups: tuple[str, ...],
                rng: np.random.Generator, mirror: float | None = None) -> np.ndarray:
  """The intensity-type groups of `groups` on one (S, S) float32 crop.

  In image-formation order: the contrast (invert), tone response (intensity), the
  sample's illumination, the optics (blur), the sensor (noise). Statistics come from the crop's real pixels (`inside`,
  (S, S) bool); padding stays 0. `mirror`: 'invert' gives mirror - image (None: the crop's
  min + max - image). Returns float32 (S, S).
  """
  whole = bool(inside.all())  # no padding: skip the copies
  real = image if whole else image[inside]
  if real.size == 0:
    return image
  stats = (float(real.min()), float(real.max()), float(real.mean()), float(real.std()))
  if 'invert' in groups and rng.random() < INVERT_PROB:
    m = stats[0] + stats[1] if mirror is None else mirror
    image = np.float32(m) - image  # std unchanged
    stats = (m - stats[1], m - stats[0], m - stats[2], stats[3])
  if 'intensity' in groups:
    image = _intensity(image, stats, rng)
  if 'illumination' in groups and rng.random() < ILLUMINATION_PROB:
    image = _illumination(image, stats[0], rng)
  if 'blur' in groups and rng.random() < BLUR_PROB:
    image = cv2.GaussianBlur(image.astype(np.float32), (0, 0), rng.uniform(0.0, BLUR_SIGMA),
                             borderType=cv2.BORDER_REFLECT_101)
  if 'noise' in groups:
    image = _noise(image, stats, rng)
  return (image if whole else np.where(inside, image, 0.0)).astype(np.float32, copy=False)


@dataclasses.dataclass(frozen=True)
class Augment(grain.transforms.RandomMap):
  """Random crop (or pad) to crop_size, then a random element of D4, then the robustness
  `groups` (AUGMENT_GROUPS; () = none). Elements may carry an 'ignored' map: valid=0 there.

  The crop and D4 draws come first and are the same with or without `groups`, and nothing
  else is drawn without them, so groups=() reproduces the batches of earlier versions.
  """
  crop_size: int
  flips: bool = True
  groups: tuple[str, ...] = ()
  mirror: float | None = None  # the 'invert' group's mirror point (photometric)
  scale_range: tuple[float, float] = SCALE_RANGE  # the 'scale' group's zoom factors
  dim_range: tuple[float, float] = DIM_RANGE  # the 'dim' group's factors

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    """element: 'image' float32 (H, W), 'mask' (H, W) {0, 1}, optional 'ignored' (H, W)
    {0, 1} and 'distance' float32 (H, W); returns 'image', 'mask', 'valid' (and 'distance'):
    float32 (S, S, 1), S = crop_size."""
    image, mask = element['image'], element['mask']
    h, w = image.shape
    top = int(rng.integers(0, max(h - self.crop_size, 0) + 1))
    left = int(rng.integers(0, max(w - self.crop_size, 0) + 1))
    k = int(rng.integers(DIHEDRAL_ORDER)) if self.flips else 0
    extras = [key for key in ('ignored', 'distance') if key in element]
    arrays = [image, mask, np.ones((h, w), np.float32)] + [element[key] for key in extras]
    if 'scale' in self.groups and rng.random() < SCALE_PROB:
      arrays = _scaled_crop(arrays, self.crop_size, top, left, rng, self.scale_range)
    else:
      arrays = crop_or_pad(arrays, self.crop_size, top, left)
    image, mask, valid = arrays[:3]
    extra = dict(zip(extras, arrays[3:]))
    if 'dim' in self.groups:  # the sample's brightness comes before the microscope's groups
      image = dim_objects(image, mask, valid > 0, rng, self.dim_range)
    if any(g in PHOTOMETRIC_GROUPS for g in self.groups):
      image = photometric(image, valid > 0, self.groups, rng, self.mirror)
    if 'ignored' in extra:  # unlabelled pixels: mask is 0 there already
      valid = valid * (extra['ignored'] == 0)
    out = {'image': image, 'mask': mask, 'valid': valid}
    if 'distance' in extra:
      out['distance'] = extra['distance']
    return {key: np.ascontiguousarray(dihedral(value, k))[..., None].astype(np.float32)
            for key, value in out.items()}


def train_dataset(source, *, crop_size: int, global_batch: int, num_steps: int, seed: int,
                  process_index: int = 0, process_count: int = 1, num_workers: int = 0,
                  flips: bool = True, augment: str = '', mirror: float | None = None,
                  scale_range: tuple[float, float] = SCALE_RANGE,
                  dim_range: tuple[float, float] = DIM_RANGE) -> grain.IterDataset:
  """Training batches for `num_steps` steps: seeded shuffle, reshuffled every epoch (a
  mixing.MixedSource: its seeded mixture of real and simulated images).

  `augment` is config.data.augment ('' = crop and D4 only; see `parse_augment`); `mirror`
  the 'invert' group's mirror point (preprocess.mirror_point of the normalisation);
  `scale_range` the 'scale' group's zoom factors (config.data.scale_range), `dim_range` the
  'dim' group's factors (config.data.dim_range).

  The element order, and each element's augmentation, depend only on the seed and the
  position in the global stream, not on the number of processes: process p of P takes the
  contiguous block [p * B / P, (p + 1) * B / P) of each global batch of B, which is the block
  `make_array_from_process_local_data` places on its devices, so P processes train on exactly
  the global batches of one. Its iterator state can be saved and restored.
  """
  groups = parse_augment(augment)
  local_batch = global_batch // process_count
  if isinstance(source, mixing.MixedSource):  # real and simulated images in a ratio
    # As many whole global batches as the steps and one epoch more, as below.
    ds = source.stream(seed, (num_steps + math.ceil(len(source) / global_batch)) * global_batch)
  else:
    epochs = math.ceil(num_steps * global_batch / len(source)) + 1
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(epochs)
  ds = ds.random_map(Augment(crop_size, flips, groups, mirror, tuple(scale_range),
                             tuple(dim_range)),
                     seed=seed + 1)
  # Local batch k of the stream is block k % P of global batch k // P (batching is lazy, so
  # each process only loads and augments its own elements).
  ds = ds.batch(local_batch, drop_remainder=True)[process_index::process_count]
  it = ds.to_iter_dataset()
  if num_workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return it


# The input stride of the stock networks (layers.pad_to_multiple: 8 to 32; a user's backbone
# may need more, and pads itself): evaluation pads images to a multiple of it, and crops
# adapted to small training images are one (flmiseg/train/trainer.py).
SIZE_MULTIPLE = 32


@dataclasses.dataclass(frozen=True)
class _PadTo(grain.transforms.Map):
  """Pads an element to (H, W) and adds its valid-pixel map."""
  hw: tuple[int, int]

  # A grain Map subclass (not a plain callable): grain then names it without inspecting its
  # source, whose ast parsing races with other threads on CPython 3.11.7 (gh-106905).
  def map(self, element: dict) -> dict:
    h, w = self.hw
    image, mask = element['image'][:h, :w], element['mask'][:h, :w]
    valid = np.ones(image.shape, np.float32)
    if 'ignored' in element:  # unlabelled pixels count in no metric
      valid = valid * (element['ignored'][:h, :w] == 0)
    pad = ((0, h - image.shape[0]), (0, w - image.shape[1]))
    # The image by reflection, as predict pads (inference.sliding_window): a black border
    # inside the network's field of view cost the shipped models 0.09-0.35 mean IoU on
    # 100x100 images (docs/inference.md). The padding counts in no metric (valid 0).
    return {'image': np.pad(image, pad, mode='reflect')[..., None].astype(np.float32),
            'mask': np.pad(mask, pad)[..., None].astype(np.float32),
            'valid': np.pad(valid, pad)[..., None], 'index': element['index']}


def eval_shape(source) -> tuple[int, int]:
  """The (H, W) every eval image is padded to: the largest in the set, rounded up to a
  multiple of SIZE_MULTIPLE, so that no network pads it again inside (with zeros)."""
  return tuple(-(-max(s[i] for s in source.shapes) // SIZE_MULTIPLE) * SIZE_MULTIPLE
               for i in (0, 1))


def eval_batches(source, *, global_batch: int, process_index: int = 0,
                 process_count: int = 1, hw: tuple[int, int] | None = None):
  """Yields eval batches in order; the last global batch is padded (present=0)."""
  hw = hw or eval_shape(source)
  pad = _PadTo(tuple(hw))
  ds = grain.MapDataset.source(source).map(pad)
  local_batch = global_batch // process_count
  num_batches = math.ceil(len(source) / global_batch)
  for b in range(num_batches):
    start = b * global_batch + process_index * local_batch
    indices = range(start, start + local_batch)
    elements = [ds[i] if i < len(source) else None for i in indices]
    template = next(e for e in [ds[0]] + elements if e is not None)
    filled = [e if e is not None else _blank(template) for e in elements]
    batch = {k: np.stack([e[k] for e in filled]) for k in ('image', 'mask', 'valid')}
    batch['present'] = np.array([e is not None for e in elements], np.float32)
    batch['index'] = np.array([e['index'] if e is not None else -1 for e in elements],
                              np.int32)
    yield batch


def _blank(template: dict) -> dict:
  return {k: np.zeros_like(v) for k, v in template.items()}
