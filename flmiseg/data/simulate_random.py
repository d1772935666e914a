"""Domain randomisation: simulator knobs drawn per image, so a model trained only on simulated
images meets many microscopes (noise, PSF, pixel size, background, camera) rather than one.

`random_params(kind, rng, preset)` draws a `simulate.Params` from a preset (PRESETS):

  knob               'wide' (training)                 'shifted' (held-out test)
  photons            log-uniform 10-3000 (SNR ~3-55)   log-uniform 30-80 (SNR ~5-9)
  photons_at_peak    True                              True
  psf                gaussian 70%, airy 30%            gaussian 50%, airy 50%
  scale              log-uniform 0.6-1.6               log-uniform 1.25-1.5 (larger objects)
                     (nucleus: 0.35-2.5, KIND_PRESETS)
  psf_sigma          scale x uniform 0.7-2.2, clipped  scale x uniform 1.5-1.9 (1.9-2.85 px:
                     to 0.6-3.5 px (the PSF in pixels  wider than the defaults' 1.2)
                     grows with magnification too)
  density            default x log-uniform 0.6-1.6     default x log-uniform 0.7-1.0
  heterogeneity      uniform 0.15-0.6                  uniform 0.4-0.55
  haze               uniform 0-0.8                     uniform 0.4-0.6
  illumination       uniform 0-0.8                     uniform 0.4-0.7
  vignetting         50%: uniform 0-0.5, else 0        uniform 0.2-0.4
  autofluorescence   50%: uniform 0-0.3, else 0        uniform 0.05-0.15
  out_of_focus       50%: uniform 0.2-1.5, else 0      uniform 0.3-0.7
  defocus            uniform 3-6 (x psf_sigma)         uniform 3-6
  debris             60%: uniform 1-12, else 0         uniform 2-6
  hot_pixels         40%: uniform 1-20, else 0         uniform 2-10
  bit_depth          uint8 30%, uint12 30%, uint16 40% not the kind's default, equally
  offset             uniform 0-3% of the bit depth's   uniform 1-3%
                     maximum (uint16: 0-1966 counts)
  gain               fill x (maximum - offset) / photons, clipped to 0.005-50 counts/photon
                     fill log-uniform 0.06-0.9         fill log-uniform 0.15-0.6
                     (~5% of images saturate > 0.1% of their pixels)
  read_noise         gain x log-uniform 0.5-5 e-       gain x log-uniform 2-4 e-
  (min_width, max_width: the kind's defaults; scale sizes them.)
  nucleus only (KIND_PRESETS; after the others, so they keep their stream):
  brightness_range   50%: uniform 10-40, else 0        0 (the original levels)
                     (the brightest nucleus over the
                     dimmest; photons raised to at
                     least DIM_PHOTONS x it)
  debris_brightness  log-uniform 4-20 (x the          4 (the original)
                     brightest nucleus)

Every 'shifted' range lies inside the 'wide' one (tests check it), so 'shifted' measures
robustness to a change of microscope that training covered, away from the kind's defaults
(er: photons 150, psf_sigma 1.2, scale 1, uint16; nucleus: uint8).
"""

import dataclasses

import numpy as np

from flmiseg.data import simulate
from flmiseg.core.errors import UserError

# knob: (distribution, *arguments), drawn in this order:
#   ('uniform', lo, hi), ('loguniform', lo, hi), ('choice', values, probabilities),
#   ('maybe', p_on, lo, hi): uniform(lo, hi) with probability p_on, else 0 (off),
#   ('times_default', lo, hi): the kind's default x loguniform(lo, hi),
#   ('times_scale', lo, hi): scale x uniform(lo, hi), clipped to PSF_SIGMA_RANGE,
#   ('other_than_default', values): equally likely among values but the kind's default.
# offset_fraction, fill and read_electrons are not knobs: they set offset, gain, read_noise.
PRESETS = {
    'wide': {
        'photons': ('loguniform', 10.0, 3000.0),
        'psf': ('choice', ('gaussian', 'airy'), (0.7, 0.3)),
        'scale': ('loguniform', 0.6, 1.6),
        'psf_sigma': ('times_scale', 0.7, 2.2),
        'density': ('times_default', 0.6, 1.6),
        'heterogeneity': ('uniform', 0.15, 0.6),
        'haze': ('uniform', 0.0, 0.8),
        'illumination': ('uniform', 0.0, 0.8),
        'vignetting': ('maybe', 0.5, 0.0, 0.5),
        'autofluorescence': ('maybe', 0.5, 0.0, 0.3),
        'out_of_focus': ('maybe', 0.5, 0.2, 1.5),
        'defocus': ('uniform', 3.0, 6.0),
        'debris': ('maybe', 0.6, 1.0, 12.0),
        'hot_pixels': ('maybe', 0.4, 1.0, 20.0),
        'bit_depth': ('choice', ('uint8', 'uint12', 'uint16'), (0.3, 0.3, 0.4)),
        'offset_fraction': ('uniform', 0.0, 0.03),
        'fill': ('loguniform', 0.06, 0.9),
        'read_electrons': ('loguniform', 0.5, 5.0),
    },
    'shifted': {
        'photons': ('loguniform', 30.0, 80.0),
        'psf': ('choice', ('gaussian', 'airy'), (0.5, 0.5)),
        'scale': ('loguniform', 1.25, 1.5),
        'psf_sigma': ('times_scale', 1.5, 1.9),
        'density': ('times_default', 0.7, 1.0),
        'heterogeneity': ('uniform', 0.4, 0.55),
        'haze': ('uniform', 0.4, 0.6),
        'illumination': ('uniform', 0.4, 0.7),
        'vignetting': ('uniform', 0.2, 0.4),
        'autofluorescence': ('uniform', 0.05, 0.15),
        'out_of_focus': ('uniform', 0.3, 0.7),
        'defocus': ('uniform', 3.0, 6.0),
        'debris': ('uniform', 2.0, 6.0),
        'hot_pixels': ('uniform', 2.0, 10.0),
        'bit_depth': ('other_than_default', ('uint8', 'uint12', 'uint16')),
        'offset_fraction': ('uniform', 0.01, 0.03),
        'fill': ('loguniform', 0.15, 0.6),
        'read_electrons': ('loguniform', 2.0, 4.0),
    },
}
# Per kind, entries that replace a preset's (each draws as many numbers as the one it
# replaces, so the other knobs keep their stream) or add knobs (drawn after all others, for
# the same reason). Nuclei are imaged from 10x to 100x objectives (BBBC038 has both): scale
# 0.35-2.5 draws nuclei 6 to 110 px across (radius 9-22 px x scale). Dim nuclei beside
# bright ones, and debris brighter than any nucleus, are what real fields show and the
# default levels (0.35-1) do not: brightness_range and debris_brightness. 'shifted' draws
# them too (the same number of draws) at the original values: its images are unchanged.
KIND_PRESETS = {
    ('wide', 'nucleus'): {'scale': ('loguniform', 0.35, 2.5),
                          'brightness_range': ('maybe', 0.5, 10.0, 40.0),
                          'debris_brightness': ('loguniform', 4.0, 20.0)},
    ('shifted', 'nucleus'): {'brightness_range': ('uniform', 0.0, 0.0),
                             'debris_brightness': ('uniform', 4.0, 4.0)},
}
# With brightness_range, photons are at least this many times it: the dimmest nucleus still
# gets DIM_PHOTONS photons at its peak (a signal a person sees), not one.
DIM_PHOTONS = 10.0
GAIN_RANGE = (0.005, 50.0)  # counts per photon that random_params allows
PSF_SIGMA_RANGE = (0.6, 3.5)  # pixels, that random_params allows


def _draw(rng: np.random.Generator, spec: tuple, default, drawn: dict):
  """One value of a PRESETS entry."""
  how, *args = spec
  if how == 'uniform':
    return float(rng.uniform(*args))
  if how == 'loguniform':
    return float(np.exp(rng.uniform(np.log(args[0]), np.log(args[1]))))
  if how == 'times_scale':  # the PSF in pixels grows with the pixel density, like objects
    return float(np.clip(drawn['scale'] * rng.uniform(*args), *PSF_SIGMA_RANGE))
  if how == 'times_default':
    return float(default * np.exp(rng.uniform(np.log(args[0]), np.log(args[1]))))
  if how == 'maybe':
    on, value = rng.random() < args[0], float(rng.uniform(args[1], args[2]))
    return value if on else 0.0
  if how == 'choice':
    return str(args[0][rng.choice(len(args[0]), p=args[1])])
  if how == 'other_than_default':
    values = [v for v in args[0] if v != default]
    return str(values[rng.integers(len(values))])
  raise ValueError(f'unknown distribution {how!r}')


def preset_specs(preset: str, kind: str) -> dict:
  """The PRESETS entry `preset` with `kind`'s KIND_PRESETS entries in place."""
  return {**PRESETS[preset], **KIND_PRESETS.get((preset, kind), {})}


def random_params(kind: str, rng: np.random.Generator, preset: str = 'wide') -> simulate.Params:
  """Simulator knobs for one image, drawn from `preset` (see the module docstring's table).

  Args:
    kind: 'er', 'mito' or 'nucleus' (density and the default bit depth are the kind's).
    rng: the generator to draw from (the same generator state gives the same Params).
    preset: 'wide' (the training distribution) or 'shifted' (a held-out test distribution).
  Returns:
    Params with every knob set (photons_at_peak=True), valid for `simulate.resolve`.
  """
  if preset not in PRESETS:
    raise UserError(f'randomize={preset!r} is not a preset; valid: {", ".join(PRESETS)}')
  defaults = simulate.resolve(kind, None)
  draws = {}
  for name, spec in preset_specs(preset, kind).items():
    draws[name] = _draw(rng, spec, getattr(defaults, name, None), draws)
  if kind == 'nucleus':
    # Annotators of nuclei label the blurred ones too (a monolayer is thinner than the depth
    # of field), so an out-of-focus nucleus missing from the mask would teach the model to
    # miss real ones. Drawn above all the same, so the other knobs keep their stream.
    draws['out_of_focus'] = 0.0
  if draws.get('brightness_range'):
    draws['photons'] = max(draws['photons'], DIM_PHOTONS * draws['brightness_range'])
  top = simulate.BIT_DEPTHS[draws['bit_depth']][1]
  offset = draws.pop('offset_fraction') * top
  gain = float(np.clip(draws.pop('fill') * (top - offset) / draws['photons'], *GAIN_RANGE))
  read_noise = draws.pop('read_electrons') * gain
  params = dataclasses.replace(defaults, **draws, offset=offset, gain=gain,
                               read_noise=read_noise, photons_at_peak=True)
  return simulate.resolve(kind, params)
