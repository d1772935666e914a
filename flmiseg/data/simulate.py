"""A simulator of fluorescence microscopy images of intracellular structures, with exact
ground truth: the project's embedded default dataset.

Kinds:
  'er'       a tubular network: the edges of a random Voronoi diagram (3-way junctions,
             polygonal loops of varied size), curved, 1-3 px wide, some pruned, plus a few
             peripheral sheets (filled irregular patches); denser near a nucleus-shaped hole.
  'mito'     rods and curved tubules (10-80 px long, 3-7 px wide), some branched, some
             fragmented into puncta, clustered in the cytoplasm of a cell.
  'nucleus'  irregular ellipses (perturbed radius) of varied size and brightness with
             textured interiors (chromatin), touching and overlapping, a few small bright
             mitotic ones.
Image formation (all kinds): structure -> fluorophore density with intensity variation along
the structure -> blur by a point spread function (Gaussian or Airy) -> background (camera
offset, smooth out-of-focus haze, uneven illumination) -> Poisson shot noise for a photon
budget + Gaussian read noise -> quantisation to uint16 (er, mito) or uint8 (nucleus).
The mask is the structure's geometry on the pixel grid before blur (uint8, 0/255).
Everything is reproducible from a seed.
"""

import dataclasses
import os
import pathlib
import shutil

import cv2
import numpy as np
import scipy.ndimage as ndi
import scipy.signal
import scipy.special
import scipy.spatial
import tifffile

from flmiseg.errors import UserError

KINDS = ('er', 'mito', 'nucleus')


@dataclasses.dataclass(frozen=True)
class Params:
  """The knobs of the simulator; `None` fields take the kind's default (DEFAULTS).

  Ranges (checked by `validate`) are given in RANGES.
  """
  density: float | None = None  # structures per 256x256 (er: seed points; mito/nucleus: objects)
  min_width: float | None = None  # structure width, pixels (er/mito) or radius (nucleus)
  max_width: float | None = None
  photons: float | None = None  # expected photons at the brightest structure pixel (SNR)
  read_noise: float | None = None  # camera read noise, counts (standard deviation)
  psf: str = 'gaussian'  # 'gaussian' or 'airy'
  psf_sigma: float = 1.2  # PSF width: Gaussian sigma in pixels (Airy: matched core width)
  haze: float = 0.25  # out-of-focus background, as a fraction of the structure signal
  illumination: float = 0.3  # uneven illumination: relative drop towards one side (0: flat)
  offset: float | None = None  # camera offset, counts


DEFAULTS = {
    'er': dict(density=110.0, min_width=1.0, max_width=3.0, photons=150.0, read_noise=6.0,
               offset=400.0),
    'mito': dict(density=45.0, min_width=3.0, max_width=7.0, photons=300.0, read_noise=6.0,
                 offset=400.0),
    'nucleus': dict(density=14.0, min_width=9.0, max_width=22.0, photons=120.0,
                    read_noise=2.0, offset=8.0),
}
RANGES = {
    'density': (1.0, 1000.0), 'min_width': (1.0, 60.0), 'max_width': (1.0, 60.0),
    'photons': (5.0, 1e5), 'read_noise': (0.0, 1000.0), 'psf_sigma': (0.3, 8.0),
    'haze': (0.0, 5.0), 'illumination': (0.0, 0.95), 'offset': (0.0, 5000.0),
}


def resolve(kind: str, params: Params | None) -> Params:
  """`params` with the kind's defaults filled in, validated."""
  if kind not in KINDS:
    raise UserError(f'kind={kind!r} is not a kind; valid: {", ".join(KINDS)}')
  params = params or Params()
  filled = {k: v if v is not None else DEFAULTS[kind].get(k)
            for k, v in dataclasses.asdict(params).items()}
  for name, (low, high) in RANGES.items():
    if not low <= filled[name] <= high:
      raise UserError(f'simulator knob {name}={filled[name]} is outside [{low}, {high}]')
  if filled['min_width'] > filled['max_width']:
    raise UserError(f'simulator knob min_width={filled["min_width"]} exceeds '
                    f'max_width={filled["max_width"]}')
  if filled['psf'] not in ('gaussian', 'airy'):
    raise UserError(f'simulator knob psf={filled["psf"]!r}; valid: gaussian, airy')
  return Params(**filled)


def _smooth_noise(rng, shape, sigma: float) -> np.ndarray:
  """Smooth random field, zero mean, unit standard deviation."""
  field = ndi.gaussian_filter(rng.standard_normal(shape), sigma, mode='wrap')
  return (field - field.mean()) / (field.std() + 1e-9)


def _blob_contour(rng, center, radii, angle: float, roughness: float, n: int = 48):
  """Closed contour (n, 2) int32 of an ellipse with a randomly perturbed radius."""
  theta = np.linspace(0, 2 * np.pi, n, endpoint=False)
  r = np.ones(n)
  for k in range(2, 6):
    r += roughness / k * rng.standard_normal() * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
  x, y = radii[0] * r * np.cos(theta), radii[1] * r * np.sin(theta)
  c, s = np.cos(angle), np.sin(angle)
  pts = np.stack([center[0] + c * x - s * y, center[1] + s * x + c * y], -1)
  return np.round(pts).astype(np.int32)


def _curve(p0, p1, bend: float, n: int = 12) -> np.ndarray:
  """Quadratic Bezier from p0 to p1, its control point pushed sideways by bend x length."""
  p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
  d = p1 - p0
  ctrl = (p0 + p1) / 2 + bend * np.array([-d[1], d[0]])
  t = np.linspace(0, 1, n)[:, None]
  return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * ctrl + t ** 2 * p1


def _polyline(canvas, pts, width: int, value=1.0) -> None:
  cv2.polylines(canvas, [np.round(pts).astype(np.int32)], False, value, int(width),
                lineType=cv2.LINE_8)


def _er(rng, h, w, p: Params):
  """ER network geometry: (structure map (H, W) float32 in {0,1}, brightness map)."""
  mask = np.zeros((h, w), np.float32)
  area = h * w / 256.0**2
  # The nucleus-shaped hole, and seed points denser near it.
  c = np.array([rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h])
  radii = rng.uniform(0.12, 0.2, 2) * min(h, w)
  hole = np.zeros((h, w), np.uint8)
  cv2.fillPoly(hole, [_blob_contour(rng, c, radii, rng.uniform(0, np.pi), 0.15)], 1)
  n = max(8, int(p.density * area * 2))
  pts = rng.uniform(-0.1, 1.1, (n, 2)) * [w, h]
  dist = np.linalg.norm((pts - c) / radii, axis=1)
  keep = rng.random(n) < np.clip(1.6 / (0.6 + 0.5 * dist), 0.15, 1.0)
  vor = scipy.spatial.Voronoi(pts[keep])
  for a, b in vor.ridge_vertices:
    if a < 0 or b < 0 or rng.random() < 0.12:  # open ends: prune some edges
      continue
    p0, p1 = vor.vertices[a], vor.vertices[b]
    if np.linalg.norm(p1 - p0) > 0.5 * max(h, w):
      continue
    width = int(np.clip(round(rng.normal(1.6, 0.6)), p.min_width, p.max_width))
    _polyline(mask, _curve(p0, p1, rng.normal(0, 0.12)), width)
  # Peripheral sheets: filled irregular patches away from the nucleus.
  for _ in range(rng.poisson(2.0 * area)):
    centre = rng.uniform(0, 1, 2) * [w, h]
    contour = _blob_contour(rng, centre, rng.uniform(4, 12, 2), rng.uniform(0, np.pi), 0.5)
    cv2.fillPoly(mask, [contour], 1.0)
  mask[hole > 0] = 0
  brightness = np.exp(0.35 * _smooth_noise(rng, (h, w), 6.0))
  return mask, brightness


def _mito(rng, h, w, p: Params):
  """Mitochondria geometry in the cytoplasm of one cell."""
  mask = np.zeros((h, w), np.float32)
  cell = np.zeros((h, w), np.uint8)
  c = np.array([rng.uniform(0.4, 0.6) * w, rng.uniform(0.4, 0.6) * h])
  cv2.fillPoly(cell, [_blob_contour(rng, c, rng.uniform(0.38, 0.55, 2) * [w, h],
                                    rng.uniform(0, np.pi), 0.25)], 1)
  nucleus = np.zeros((h, w), np.uint8)
  cv2.fillPoly(nucleus, [_blob_contour(rng, c + rng.normal(0, 8, 2),
                                       rng.uniform(0.1, 0.16, 2) * min(h, w), 0.0, 0.1)], 1)
  ys, xs = np.nonzero(cell & (1 - nucleus))
  n = max(1, int(p.density * h * w / 256.0**2))
  for _ in range(n):
    i = rng.integers(len(ys))
    start = np.array([xs[i], ys[i]], float)
    length = rng.uniform(10, 80)
    width = int(round(rng.uniform(p.min_width, p.max_width)))
    heading = rng.uniform(0, 2 * np.pi)
    steps = max(2, int(length / 4))
    turns = np.cumsum(rng.normal(0, 0.25, steps))
    path = start + np.cumsum(4 * np.stack([np.cos(heading + turns),
                                           np.sin(heading + turns)], -1), 0)
    path = np.vstack([start, path])
    kind = rng.random()
    if kind < 0.15:  # fragmented into puncta along the path
      for q in path[::2]:
        cv2.circle(mask, tuple(np.round(q).astype(int)), max(1, width // 2 + 1), 1.0, -1)
    else:
      _polyline(mask, path, width)
      if kind > 0.8:  # branched
        j = rng.integers(1, len(path))
        angle = heading + turns[min(j, steps - 1)] + rng.choice([-1, 1]) * rng.uniform(0.6, 1.3)
        branch = path[j] + np.outer(np.arange(1, 4 + steps // 2), 4 * np.array(
            [np.cos(angle), np.sin(angle)]))
        _polyline(mask, np.vstack([path[j], branch]), max(2, width - 1))
  mask *= cell
  brightness = np.exp(0.3 * _smooth_noise(rng, (h, w), 4.0)) * (1 - 0.8 * nucleus)
  return mask, brightness


def _nucleus(rng, h, w, p: Params):
  """Nuclei: irregular ellipses of varied brightness with chromatin texture."""
  mask = np.zeros((h, w), np.float32)
  brightness = np.zeros((h, w), np.float32)
  n = max(1, int(rng.poisson(p.density * h * w / 256.0**2)))
  texture = np.exp(0.35 * _smooth_noise(rng, (h, w), 1.5))
  for k in range(n):
    mitotic = rng.random() < 0.08
    radius = rng.uniform(p.min_width, p.max_width) * (0.45 if mitotic else 1.0)
    radii = radius * np.array([1.0, rng.uniform(0.6, 1.0)])
    centre = rng.uniform(0, 1, 2) * [w, h]
    blob = np.zeros((h, w), np.uint8)
    cv2.fillPoly(blob, [_blob_contour(rng, centre, radii, rng.uniform(0, np.pi), 0.25)], 1)
    level = rng.uniform(2.0, 3.0) if mitotic else rng.uniform(0.35, 1.0)
    brightness = np.where(blob > 0, np.maximum(brightness, level), brightness)
    mask[blob > 0] = 1.0
  return mask, brightness * texture


_GEOMETRY = {'er': _er, 'mito': _mito, 'nucleus': _nucleus}


def _psf_blur(x: np.ndarray, p: Params) -> np.ndarray:
  if p.psf == 'gaussian':
    return ndi.gaussian_filter(x, p.psf_sigma)
  # Airy pattern with its core matched to the Gaussian's width (FWHM ~ 1.029 lambda/NA).
  r_max = int(np.ceil(6 * p.psf_sigma))
  yy, xx = np.mgrid[-r_max:r_max + 1, -r_max:r_max + 1]
  v = np.hypot(yy, xx) * 3.8317 / (2.355 * p.psf_sigma * 1.22 / 1.029) + 1e-9
  kernel = (2 * scipy.special.j1(v) / v) ** 2
  return scipy.signal.fftconvolve(x, kernel / kernel.sum(), mode='same')


def simulate(kind: str, size, rng: np.random.Generator, params: Params | None = None):
  """One image and its mask.

  Args:
    kind: 'er', 'mito' or 'nucleus'.
    size: side, or (H, W).
    rng: the random generator (all randomness comes from it).
    params: knobs (None: the kind's defaults).
  Returns:
    (image (H, W) uint16 for er/mito or uint8 for nucleus, mask (H, W) uint8 in {0, 255}).
  """
  p = resolve(kind, params)
  h, w = (size, size) if np.isscalar(size) else tuple(size)
  structure, brightness = _GEOMETRY[kind](rng, h, w, p)
  density = structure * brightness
  blurred = np.clip(_psf_blur(density, p), 0, None)
  haze = ndi.gaussian_filter(density, 12.0) * 3.0 + 0.3 * (1 + 0.5 * _smooth_noise(
      rng, (h, w), 24.0)).clip(0, None)
  angle = rng.uniform(0, 2 * np.pi)
  ramp = (np.cos(angle) * (np.arange(w)[None] / w - 0.5) +
          np.sin(angle) * (np.arange(h)[:, None] / h - 0.5))
  illumination = 1.0 - p.illumination * (ramp + 0.5)
  expected = p.photons * illumination * (blurred + p.haze * haze)
  counts = rng.poisson(expected).astype(np.float64)
  counts += p.offset + rng.normal(0, p.read_noise, (h, w))
  dtype = np.uint8 if kind == 'nucleus' else np.uint16
  image = np.clip(np.round(counts), 0, np.iinfo(dtype).max).astype(dtype)
  return image, (structure > 0).astype(np.uint8) * 255


_SPLITS = {'train': 0, 'test': 1}


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
  """The generator of image `index` of `split`: each image is reproducible on its own."""
  return np.random.default_rng(np.random.SeedSequence([seed, _SPLITS[split], index]))


def write_dataset(kind: str, out_dir, num_train: int, num_test: int, size: int = 256,
                  seed: int = 0, overwrite: bool = False,
                  params: Params | None = None) -> pathlib.Path:
  """Simulates a dataset in the reference's list format.

  Writes out_dir/{train,test}/{images,masks}/<kind>_<index>.tif and out_dir/train.txt,
  out_dir/test.txt (one `image mask` pair per line, relative to out_dir). The folder is built
  next to out_dir and renamed at the end, so an interrupted run never leaves a half-written
  dataset behind. Refuses a non-empty out_dir unless overwrite=True.
  """
  resolve(kind, params)
  out = pathlib.Path(out_dir)
  if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
    raise UserError(f'{out} is not empty; choose another folder or pass --overwrite')
  if min(num_train, num_test) < 0 or num_train + num_test == 0 or size < 16:
    raise UserError(f'need num_train, num_test >= 0 (not both 0) and size >= 16; got '
                    f'{num_train}, {num_test}, {size}')
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_name(f'.{out.name}.partial-{os.getpid()}')
  shutil.rmtree(tmp, ignore_errors=True)
  for split, count in (('train', num_train), ('test', num_test)):
    (tmp / split / 'images').mkdir(parents=True)
    (tmp / split / 'masks').mkdir(parents=True)
    lines = []
    for i in range(count):
      image, mask = simulate(kind, size, image_rng(seed, split, i), params)
      name = f'{kind}_{i:05d}.tif'
      tifffile.imwrite(tmp / split / 'images' / name, image, compression='zlib')
      tifffile.imwrite(tmp / split / 'masks' / name, mask, compression='zlib')
      lines.append(f'{split}/images/{name} {split}/masks/{name}\n')
    (tmp / f'{split}.txt').write_text(''.join(lines))
  if out.exists():
    shutil.rmtree(out) if out.is_dir() else out.unlink()
  os.replace(tmp, out)
  return out
