"""A simulator of fluorescence microscopy images of intracellular structures, with exact
ground truth: the project's embedded default dataset.

Kinds:
  'er'       a tubular network: the edges of a random Voronoi diagram (3-way junctions,
             polygonal loops of varied size), curved, 1-3 px wide, some pruned, plus a few
             peripheral sheets (filled irregular patches); denser near a nucleus-shaped hole.
  'mito'     rods and curved tubules (10-80 px long, 3-7 px wide), some branched, some
             fragmented into puncta, clustered in the cytoplasm of a cell.
  'nucleus'  irregular ellipses (perturbed radius) of varied size and brightness (up to
             2.9x, or `brightness_range`: 10x and more) with textured interiors (chromatin),
             touching and overlapping, a few small bright mitotic ones.
Image formation (all kinds): structure (er, mito: optionally ending at a cell's edge, beyond
which no light but debris reaches the camera: `outside`) -> fluorophore density varying along
the structure (+ debris) -> blur by a point spread function (Gaussian or Airy) (+ an
out-of-focus layer of the same kind blurred 3-6x wider, + autofluorescence) -> background
(haze, uneven illumination, vignetting) -> Poisson shot noise x camera gain + offset + read
noise (+ hot pixels) -> uint16 (er, mito), uint8 (nucleus) or `bit_depth`, clipped at its
maximum (saturation).
The mask is the in-focus structure's geometry on the pixel grid before blur (uint8, 0/255),
or with masks='visible' that structure as an annotator draws it, out to where its blurred
image falls to half its local peak (MASKS); never the out-of-focus layer or debris;
write_dataset writes nucleus and mito masks as uint16 label images (one value per object,
INSTANCE_KINDS), which every reader still takes as foreground wherever nonzero. Everything
is reproducible from a seed; `Params()` reproduces the original simulator exactly;
simulate_random.py draws the knobs per image.
"""

import dataclasses
import json
import os
import pathlib
import shutil

import cv2
import numpy as np
import scipy.ndimage as ndi
import scipy.special
import scipy.spatial
from skimage import segmentation
import tifffile

from flmiseg.core.errors import UserError

KINDS = ('er', 'mito', 'nucleus')
# How masks are drawn. 'geometry': the structure itself on the pixel grid, before blur (1-3 px
# wide ER tubules stay 1-3 px however wide the PSF). 'visible': as a person annotates an image,
# the structure out to the half maximum of its blurred, noise-free image (`_visible`): a tubule
# narrower than the PSF is drawn as wide as it looks, about its width and the PSF's FWHM
# (2.355 psf_sigma) combined; an edge of a large object stays where it is.
MASKS = ('geometry', 'visible')
INSTANCE_KINDS = ('mito', 'nucleus')  # write_dataset writes their masks as label images


@dataclasses.dataclass(frozen=True)
class Params:
  """The knobs of the simulator; `None` fields take the kind's default (DEFAULTS). Valid
  ranges: RANGES. The knobs after `offset` default to off (Params() is the original)."""
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
  # Object size multiplier (widths, radii, lengths, texture; density / scale^2): the same
  # specimen at another pixel size. 1: the kind's sizes.
  scale: float = 1.0
  heterogeneity: float | None = None  # std of log brightness along/within structures
  # True: `photons` is the expected count at the bright end (95th percentile) of the blurred
  # in-focus structure, whatever its width and the PSF, so SNR ~ sqrt(photons). False: photons
  # times the fluorophore density before blur (the original scaling).
  photons_at_peak: bool = False
  # An extra layer of the same kind above/below the focal plane: its fluorophore relative to
  # the in-focus layer (0: off), blurred by `defocus` x psf_sigma. Never in the mask.
  out_of_focus: float = 0.0
  defocus: float = 4.5
  debris: float = 0.0  # non-structure spots and blobs per 256x256, bright or dim; not in the mask
  autofluorescence: float = 0.0  # mottled background texture, fraction of the peak signal
  vignetting: float = 0.0  # radial illumination drop at the corners (0: flat)
  hot_pixels: float = 0.0  # hot camera pixels per 256x256
  # Fraction of the field outside the cell (er, mito): beyond a curved cell edge there is no
  # structure, haze, out-of-focus light or autofluorescence, only the camera's background
  # (and debris). 0: the cell fills the field.
  outside: float = 0.0
  # Nucleus thickness (nucleus): the brightness of each nucleus falls towards its edge as a
  # flattened ellipsoid's thickness does, by this fraction at the edge (0: flat, the original),
  # so touching nuclei meet in a dimmer seam, as in widefield images of real ones.
  thickness: float = 0.0
  # Nucleus brightness spread (nucleus): the brightest nucleus's fluorophore over the dimmest's
  # in one image, the others log-uniformly between in the order they were drawn (a few small
  # bright mitotic ones still above all). 0: the original levels, uniform 0.35-1 (up to 2.9x).
  brightness_range: float = 0.0
  # The brightest debris relative to a structure's fluorophore: debris levels are log-uniform
  # from 0.2 to it. 4: the original.
  debris_brightness: float = 4.0
  gain: float = 1.0  # camera counts per photon
  # 'uint8', 'uint12' (0-4095 in a uint16 container) or 'uint16'; None: uint16 (er, mito) or
  # uint8 (nucleus). Counts are clipped at the container's maximum.
  bit_depth: str | None = None


DEFAULTS = {
    'er': dict(density=110.0, min_width=1.0, max_width=3.0, photons=150.0, read_noise=6.0,
               offset=400.0, heterogeneity=0.35, bit_depth='uint16'),
    'mito': dict(density=45.0, min_width=3.0, max_width=7.0, photons=300.0, read_noise=6.0,
                 offset=400.0, heterogeneity=0.3, bit_depth='uint16'),
    'nucleus': dict(density=14.0, min_width=9.0, max_width=22.0, photons=120.0,
                    read_noise=2.0, offset=8.0, heterogeneity=0.35, bit_depth='uint8'),
}
# Valid values of the numeric knobs (what `resolve` accepts; random_params draws within them).
RANGES = {
    'density': (1.0, 1000.0), 'min_width': (1.0, 60.0), 'max_width': (1.0, 60.0),
    'photons': (5.0, 1e5), 'read_noise': (0.0, 1000.0), 'psf_sigma': (0.3, 8.0),
    'haze': (0.0, 5.0), 'illumination': (0.0, 0.95), 'offset': (0.0, 5000.0),
    'scale': (0.25, 4.0), 'heterogeneity': (0.0, 1.5), 'out_of_focus': (0.0, 5.0),
    'defocus': (1.5, 10.0), 'debris': (0.0, 200.0), 'autofluorescence': (0.0, 5.0),
    'vignetting': (0.0, 0.9), 'hot_pixels': (0.0, 1000.0), 'gain': (0.001, 1000.0),
    'outside': (0.0, 0.9), 'thickness': (0.0, 1.0), 'brightness_range': (0.0, 1000.0),
    'debris_brightness': (0.2, 1000.0),
}
# bit_depth -> (container dtype, largest count).
BIT_DEPTHS = {'uint8': (np.uint8, 255), 'uint12': (np.uint16, 4095),
              'uint16': (np.uint16, 65535)}


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
  if filled['outside'] > 0 and kind == 'nucleus':
    raise UserError('simulator knob outside applies to er and mito (a cell edge); nuclei '
                    'have no cell around them here')
  if filled['thickness'] > 0 and kind != 'nucleus':
    raise UserError(f'simulator knob thickness applies to nucleus (a nucleus\'s profile), not '
                    f'{kind}')
  if filled['brightness_range'] > 0 and kind != 'nucleus':
    raise UserError(f'simulator knob brightness_range applies to nucleus, not {kind}')
  if 0 < filled['brightness_range'] < 1:
    raise UserError(f'simulator knob brightness_range={filled["brightness_range"]}: 0 (off) '
                    'or a ratio >= 1')
  if filled['psf'] not in ('gaussian', 'airy'):
    raise UserError(f'simulator knob psf={filled["psf"]!r}; valid: gaussian, airy')
  if filled['bit_depth'] not in BIT_DEPTHS:
    raise UserError(f'simulator knob bit_depth={filled["bit_depth"]!r}; valid: '
                    f'{", ".join(BIT_DEPTHS)}')
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
  """ER network geometry: (object map (H, W) float32 in {0, 1} (one network), brightness
  map (H, W)); every geometry returns this pair, object maps numbering objects 1, 2, ..."""
  mask = np.zeros((h, w), np.float32)
  area = h * w / 256.0**2
  s = p.scale  # 1.0 multiplies exactly, so the default path is the original one
  # The nucleus-shaped hole (grows with scale; radius at most a third of the field), and seeds
  # denser near it.
  c = np.array([rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h])
  radii = np.minimum(rng.uniform(0.12, 0.2, 2) * min(h, w) * s, 0.33 * min(h, w))
  hole = np.zeros((h, w), np.uint8)
  cv2.fillPoly(hole, [_blob_contour(rng, c, radii, rng.uniform(0, np.pi), 0.15)], 1)
  n = max(8, int(p.density / s**2 * area * 2))
  pts = rng.uniform(-0.1, 1.1, (n, 2)) * [w, h]
  dist = np.linalg.norm((pts - c) / radii, axis=1)
  keep = rng.random(n) < np.clip(1.6 / (0.6 + 0.5 * dist), 0.15, 1.0)
  keep[:4] |= keep.sum() < 4  # Voronoi needs 4 points (tiny or zoomed-in images crashed)
  vor = scipy.spatial.Voronoi(pts[keep])
  for a, b in vor.ridge_vertices:
    if a < 0 or b < 0 or rng.random() < 0.12:  # open ends: prune some edges
      continue
    p0, p1 = vor.vertices[a], vor.vertices[b]
    if np.linalg.norm(p1 - p0) > 0.5 * max(h, w):
      continue
    width = max(1, int(np.clip(round(rng.normal(1.6, 0.6) * s), p.min_width * s,
                               p.max_width * s)))
    _polyline(mask, _curve(p0, p1, rng.normal(0, 0.12)), width)
  # Peripheral sheets: filled irregular patches away from the nucleus.
  for _ in range(rng.poisson(2.0 * area / s**2)):
    centre = rng.uniform(0, 1, 2) * [w, h]
    contour = _blob_contour(rng, centre, rng.uniform(4, 12, 2) * s, rng.uniform(0, np.pi), 0.5)
    cv2.fillPoly(mask, [contour], 1.0)
  mask[hole > 0] = 0
  brightness = np.exp(p.heterogeneity * _smooth_noise(rng, (h, w), 6.0 * s))
  return mask, brightness


def _mito(rng, h, w, p: Params):
  """Mitochondria geometry in the cytoplasm of one cell (object k: the k-th tubule)."""
  mask = np.zeros((h, w), np.float32)
  cell = np.zeros((h, w), np.uint8)
  c = np.array([rng.uniform(0.4, 0.6) * w, rng.uniform(0.4, 0.6) * h])
  cv2.fillPoly(cell, [_blob_contour(rng, c, rng.uniform(0.38, 0.55, 2) * [w, h],
                                    rng.uniform(0, np.pi), 0.25)], 1)
  nucleus = np.zeros((h, w), np.uint8)
  cv2.fillPoly(nucleus, [_blob_contour(rng, c + rng.normal(0, 8, 2),
                                       rng.uniform(0.1, 0.16, 2) * min(h, w), 0.0, 0.1)], 1)
  ys, xs = np.nonzero(cell & (1 - nucleus))
  s = p.scale  # the cell keeps its size (so coverage stays), its mitochondria scale
  n = max(1, int(p.density / s**2 * h * w / 256.0**2))
  for k in range(n):
    i = rng.integers(len(ys))
    start = np.array([xs[i], ys[i]], float)
    length = rng.uniform(10, 80) * s
    width = max(1, int(round(rng.uniform(p.min_width, p.max_width) * s)))
    heading = rng.uniform(0, 2 * np.pi)
    steps = max(2, int(length / (4 * s)))
    turns = np.cumsum(rng.normal(0, 0.25, steps))
    path = start + np.cumsum(4 * s * np.stack([np.cos(heading + turns),
                                           np.sin(heading + turns)], -1), 0)
    path = np.vstack([start, path])
    kind = rng.random()
    if kind < 0.15:  # fragmented into puncta along the path
      for q in path[::2]:
        cv2.circle(mask, tuple(np.round(q).astype(int)), max(1, width // 2 + 1), k + 1.0, -1)
    else:
      _polyline(mask, path, width, k + 1.0)
      if kind > 0.8:  # branched
        j = rng.integers(1, len(path))
        angle = heading + turns[min(j, steps - 1)] + rng.choice([-1, 1]) * rng.uniform(0.6, 1.3)
        branch = path[j] + np.outer(np.arange(1, 4 + steps // 2), 4 * s * np.array(
            [np.cos(angle), np.sin(angle)]))
        _polyline(mask, np.vstack([path[j], branch]), max(2, width - 1), k + 1.0)
  mask *= cell
  brightness = np.exp(p.heterogeneity * _smooth_noise(rng, (h, w), 4.0 * s)) * (
      1 - 0.8 * nucleus)
  return mask, brightness


def _nucleus(rng, h, w, p: Params):
  """Nuclei: irregular ellipses of varied brightness with chromatin texture (object k: the
  k-th nucleus, where not covered by a later one)."""
  mask = np.zeros((h, w), np.float32)
  brightness = np.zeros((h, w), np.float32)
  s = p.scale
  n = max(1, int(rng.poisson(p.density / s**2 * h * w / 256.0**2)))
  texture = np.exp(p.heterogeneity * _smooth_noise(rng, (h, w), 1.5 * s))
  # brightness_range: each pixel's drawn level too, mapped at the end (draws unchanged).
  levels = np.zeros((h, w), np.float32) if p.brightness_range > 0 else None
  for k in range(n):
    mitotic = rng.random() < 0.08
    radius = rng.uniform(p.min_width, p.max_width) * (0.45 if mitotic else 1.0) * s
    radii = radius * np.array([1.0, rng.uniform(0.6, 1.0)])
    centre = rng.uniform(0, 1, 2) * [w, h]
    blob = np.zeros((h, w), np.uint8)
    cv2.fillPoly(blob, [_blob_contour(rng, centre, radii, rng.uniform(0, np.pi), 0.25)], 1)
    level = rng.uniform(2.0, 3.0) if mitotic else rng.uniform(0.35, 1.0)
    if p.thickness > 0:  # on top of what it covers, as its mask is, its dim edge a seam
      brightness = np.where(blob > 0, level * _thickness(blob, p.thickness), brightness)
      if levels is not None:
        levels = np.where(blob > 0, level, levels)
    else:
      brightness = np.where(blob > 0, np.maximum(brightness, level), brightness)
      if levels is not None:
        levels = np.where(blob > 0, np.maximum(levels, level), levels)
    mask[blob > 0] = k + 1.0  # a later nucleus lies on top of an earlier one
  if levels is not None:
    spread = spread_levels(levels, p.brightness_range)
    brightness = np.where(levels > 0, brightness * spread / np.maximum(levels, 1e-9), 0.0)
  return mask, brightness * texture


def spread_levels(levels: np.ndarray, brightness_range: float) -> np.ndarray:
  """Nucleus levels (the original draws: 0.35-1, mitotic 2-3, 0 background) mapped so that
  the drawn 0.35-1 levels span exactly 1 / brightness_range to 1, log-linearly in the order
  they were drawn (the dimmest drawn to 1 / brightness_range, the brightest to 1); mitotic
  levels (above 1) and the background (0) unchanged. Monotone, so which nucleus is on top
  where they overlap does not change."""
  normal = levels[(levels > 0) & (levels <= 1.0)]
  if not normal.size:
    return levels
  lo, hi = float(normal.min()), float(normal.max())
  t = (levels - hi) / (hi - lo) if hi > lo else np.zeros_like(levels)
  mapped = np.power(brightness_range, t, dtype=np.float64)
  return np.where((levels > 0) & (levels <= 1.0), mapped, levels).astype(np.float32)


def _thickness(blob: np.ndarray, falloff: float) -> np.ndarray:
  """A nucleus's relative thickness over its `blob` (H, W) uint8: 1 - falloff at its edge
  rising to 1 at its deepest pixel as an ellipsoid's, sqrt(t (2 - t)) of its normalised
  depth t (the distance to the edge over the largest one); 0 outside."""
  ys, xs = np.nonzero(blob)
  out = np.zeros(blob.shape, np.float32)
  if not len(ys):
    return out
  y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
  depth = cv2.distanceTransform(np.pad(blob[y0:y1, x0:x1], 1), cv2.DIST_L2, 5)[1:-1, 1:-1]
  t = depth / depth.max()
  out[y0:y1, x0:x1] = np.where(blob[y0:y1, x0:x1] > 0,
                               1 - falloff + falloff * np.sqrt(t * (2 - t)), 0)
  return out


_GEOMETRY = {'er': _er, 'mito': _mito, 'nucleus': _nucleus}


def _cell_region(rng, h, w, p: Params) -> np.ndarray:
  """Where the cell is (H, W) float32 in [0, 1], exactly a fraction `p.outside` of the field
  outside it: a wavy edge around a centre 0.2-1.2 field sides from the field's centre (the
  farther, the straighter the edge), soft over about two pixels (the blur of the membrane's
  edge)."""
  angle = rng.uniform(0, 2 * np.pi)
  reach = rng.uniform(0.2, 1.2) * max(h, w)
  centre = np.array([w / 2, h / 2]) + reach * np.array([np.cos(angle), np.sin(angle)])
  ys, xs = np.mgrid[:h, :w].astype(np.float32)
  distance = np.hypot(xs - centre[0], ys - centre[1])
  distance += 0.06 * max(h, w) * _smooth_noise(rng, (h, w), 16.0 * p.scale)
  edge = np.quantile(distance, 1.0 - p.outside)
  return ndi.gaussian_filter((distance <= edge).astype(np.float32), 1.5)


def _psf_blur(x: np.ndarray, p: Params) -> np.ndarray:
  if p.psf == 'gaussian':
    return ndi.gaussian_filter(x, p.psf_sigma)
  # Airy pattern with its core matched to the Gaussian's width (FWHM ~ 1.029 lambda/NA).
  r_max = int(np.ceil(6 * p.psf_sigma))
  yy, xx = np.mgrid[-r_max:r_max + 1, -r_max:r_max + 1]
  v = np.hypot(yy, xx) * 3.8317 / (2.355 * p.psf_sigma * 1.22 / 1.029) + 1e-9
  kernel = (2 * scipy.special.j1(v) / v) ** 2
  # Imported here: scipy.signal takes most of a second to import, and every command imports
  # this module (config checks) while only simulating needs it.
  from scipy import signal  # pylint: disable=g-import-not-at-top
  return signal.fftconvolve(x, kernel / kernel.sum(), mode='same')


def _visible(objects: np.ndarray, p: Params) -> np.ndarray:
  """`objects` (H, W) (0 background, else an object number) as they look: also every pixel
  within 2 psf_sigma + 1 px of an object where the PSF-blurred structure (indicator, noise-free,
  uniform brightness) is at least half of the nearest object pixel's local peak (the largest
  blurred value on object pixels within psf_sigma of it), numbered as that object. A thin
  tubule's peak is its ridge, so it grows to its half maximum; a large object's is its
  interior, so its edge stays."""
  outside = objects == 0
  if outside.all() or not outside.any():
    return objects
  structure = (~outside).astype(np.float32)
  blurred = _psf_blur(structure, p)
  near = int(np.ceil(p.psf_sigma))
  ridge = ndi.maximum_filter(np.where(outside, 0.0, blurred), size=2 * near + 1)
  distance, (iy, ix) = ndi.distance_transform_edt(outside, return_indices=True)
  seen = outside & (distance <= 2 * p.psf_sigma + 1) & (blurred >= 0.5 * ridge[iy, ix])
  return np.where(seen, objects[iy, ix], objects).astype(objects.dtype)


def _wide_blur(x: np.ndarray, sigma: float) -> np.ndarray:
  """Gaussian blur (H, W) float32 for wide sigmas (out-of-focus light); on a coarser grid when
  very wide, since the result is smooth anyway (and cv2 is much faster than ndimage here)."""
  h, w = x.shape
  x = x.astype(np.float32)
  f = int(min(sigma // 3, min(h, w) // 16))
  if f <= 1:
    return cv2.GaussianBlur(x, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
  small = cv2.resize(x, (w // f, h // f), interpolation=cv2.INTER_AREA)
  small = cv2.GaussianBlur(small, (0, 0), sigma / f, borderType=cv2.BORDER_REFLECT)
  return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def _debris(rng, h, w, p: Params):
  """Non-structure spots (dust, vesicles, cell fragments): (sharp, diffuse) fluorophore maps
  (H, W), the diffuse ones lying out of focus. Radii 0.6-3.5 px x scale, brightness 0.2 to
  debris_brightness (default 4) x a structure's; about a third of them out of focus."""
  sharp, diffuse = np.zeros((h, w), np.float32), np.zeros((h, w), np.float32)
  for _ in range(rng.poisson(p.debris * h * w / 256.0**2)):
    radius = np.exp(rng.uniform(np.log(0.6), np.log(3.5))) * p.scale
    level = float(np.exp(rng.uniform(np.log(0.2), np.log(p.debris_brightness))))
    radii = radius * np.array([1.0, rng.uniform(0.5, 1.0)])
    contour = _blob_contour(rng, rng.uniform(0, 1, 2) * [w, h], radii, rng.uniform(0, np.pi),
                            0.4, n=16)
    cv2.fillPoly(sharp if rng.random() < 0.67 else diffuse, [contour], level)
  return sharp, diffuse


def _fast_smooth(rng, shape, sigma: float) -> np.ndarray:
  """Like _smooth_noise (zero mean, unit std), float32 and faster; for the new knobs only."""
  field = cv2.GaussianBlur(rng.standard_normal(shape, dtype=np.float32), (0, 0), sigma,
                           borderType=cv2.BORDER_REFLECT)
  return (field - field.mean()) / (field.std() + 1e-9)


def _unfocused(kind: str, rng, h, w, p: Params, diffuse: np.ndarray | None, peak: float):
  """Light from outside the focal plane (H, W), or None when off: a layer of the same kind
  (plus the diffuse debris) blurred by defocus x psf_sigma, and autofluorescence texture
  (mean: autofluorescence x the structure's peak signal)."""
  layer = None
  if p.out_of_focus > 0:
    objects, brightness = _GEOMETRY[kind](rng, h, w, p)
    layer = p.out_of_focus * (objects > 0) * brightness
  if diffuse is not None and diffuse.any():
    layer = diffuse if layer is None else layer + diffuse
  if layer is not None:
    layer = _wide_blur(layer, p.psf_sigma * p.defocus)
  if p.autofluorescence > 0:
    # Granular cytoplasm-like texture over a coarse one; mean 1 x autofluorescence.
    field = np.exp(0.5 * _fast_smooth(rng, (h, w), rng.uniform(1.5, 4.0) * p.scale) +
                   0.4 * _fast_smooth(rng, (h, w), 20.0))
    field *= p.autofluorescence * peak / field.mean()
    layer = field if layer is None else layer + field
  return layer


def _illumination(rng, h, w, p: Params) -> np.ndarray:
  """Relative illumination (H, W): a linear drop towards a random side, and vignetting."""
  angle = rng.uniform(0, 2 * np.pi)
  ramp = (np.cos(angle) * (np.arange(w)[None] / w - 0.5) +
          np.sin(angle) * (np.arange(h)[:, None] / h - 0.5))
  # ramp + 0.5 reaches 1.21 in a corner: keep the light positive for illumination > 0.82.
  illumination = np.maximum(1.0 - p.illumination * (ramp + 0.5), 0.02)
  if p.vignetting > 0:  # 1 - vignetting at the corners
    r2 = ((np.arange(h)[:, None] + 0.5) / h - 0.5)**2 + ((np.arange(w)[None] + 0.5) / w - 0.5)**2
    illumination = illumination * (1.0 - p.vignetting * 2.0 * r2)
  return illumination


def _camera(rng, expected: np.ndarray, p: Params) -> np.ndarray:
  """The recorded image (H, W) in the bit depth's container: Poisson(expected) x gain +
  offset + read noise (+ hot pixels), rounded, clipped at 0 and the bit depth's maximum."""
  counts = rng.poisson(expected).astype(np.float64)
  if p.gain != 1.0:
    counts *= p.gain
  counts += p.offset + rng.normal(0, p.read_noise, expected.shape)
  if p.hot_pixels > 0:
    n = rng.poisson(p.hot_pixels * counts.size / 256.0**2)
    counts.flat[rng.integers(0, counts.size, n)] += p.gain * p.photons * rng.uniform(0.5, 4, n)
  dtype, top = BIT_DEPTHS[p.bit_depth]
  return np.clip(np.round(counts), 0, top).astype(dtype)


def _check_masks(masks: str) -> None:
  if masks not in MASKS:
    raise UserError(f'masks={masks!r} is not a way to draw masks; valid: {", ".join(MASKS)}')


def simulate(kind: str, size, rng: np.random.Generator, params: Params | None = None,
             labels: bool = False, masks: str = 'geometry'):
  """One image and its mask.

  Args:
    kind: 'er', 'mito' or 'nucleus'.
    size: side, or (H, W).
    rng: the random generator (all randomness comes from it).
    params: knobs (None: the kind's defaults).
    labels: return the mask as a label image (see Returns); the image is the same.
    masks: how the mask is drawn (MASKS); the image is the same.
  Returns:
    (image (H, W): uint16 for er/mito, uint8 for nucleus, or as params.bit_depth says (uint12:
    uint16 holding 0-4095), mask (H, W): the in-focus structure only, uint8 in {0, 255}, or
    with labels=True uint16 labels 0 (background), 1..N (one per nucleus or mitochondrion;
    where two overlap, the one drawn last; the ER network is one object), numbered in
    drawing order without gaps).
  """
  p = resolve(kind, params)
  _check_masks(masks)
  h, w = (size, size) if np.isscalar(size) else tuple(size)
  # The geometry comes first, so knobs that add light (debris, out of focus) leave the mask
  # of a given rng unchanged; those knobs draw nothing when off (Params() is the original).
  objects, brightness = _GEOMETRY[kind](rng, h, w, p)
  cell = _cell_region(rng, h, w, p) if p.outside > 0 else None
  if cell is not None:
    objects = objects * (cell > 0.5)
  structure = (objects > 0).astype(np.float32)
  density = structure * brightness
  sharp, diffuse = _debris(rng, h, w, p) if p.debris > 0 else (None, None)
  blurred = np.clip(_psf_blur(density if sharp is None else density + sharp, p), 0, None)
  peak = 1.0
  if p.photons_at_peak:
    inside = blurred[structure > 0]
    peak = max(float(np.percentile(inside, 95)) if inside.size else blurred.max(), 1e-6)
  unfocused = _unfocused(kind, rng, h, w, p, diffuse, peak)
  haze = ndi.gaussian_filter(density, 12.0 * p.scale) * 3.0 + 0.3 * (1 + 0.5 * _smooth_noise(
      rng, (h, w), 24.0)).clip(0, None)
  illumination = _illumination(rng, h, w, p)
  if cell is not None:  # the cytoplasm's haze and unfocused light end at the cell's edge
    haze = haze * cell
    unfocused = None if unfocused is None else unfocused * cell
  light = blurred if unfocused is None else blurred + unfocused
  total = light + p.haze * haze if peak == 1.0 else (light + p.haze * haze) / peak
  expected = p.photons * illumination * total
  image = _camera(rng, expected, p)
  if masks == 'visible':  # after the camera: no draw from rng, so the image is unchanged
    objects = _visible(objects, p)
  if labels:
    return image, segmentation.relabel_sequential(objects.astype(np.int64))[0].astype(np.uint16)
  return image, (objects > 0).astype(np.uint8) * 255
