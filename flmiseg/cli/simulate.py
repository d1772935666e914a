"""Writes a simulated fluorescence microscopy dataset to disk.

  python -m flmiseg.cli.simulate --kind=er --num_train=200 --num_test=20 --size=256 --seed=0 \\
      --out=DIR [--overwrite] [--randomize=wide|shifted] [--masks=visible]

--kind=all writes DIR/er, DIR/mito and DIR/nucleus. Layout: DIR/train/images/*.tif,
DIR/train/masks/*.tif, the same under test/, and DIR/train.txt, DIR/test.txt (one
`image mask` pair per line, relative to DIR), ready for --config.data.source=lists.
--randomize=wide draws every simulator knob per image (noise, PSF, object scale, background,
out-of-focus structures, debris, bit depth; flmiseg/data/simulate_random.py) and records them
in DIR/{train,test}_params.jsonl; 'shifted' is a held-out test distribution. --masks=visible
draws each mask as a person annotates what they see (a thin tubule as wide as its blur looks;
flmiseg/data/simulate.py MASKS) instead of the structure's geometry.
"""

import pathlib
import sys
import time

from absl import app
from absl import flags

from flmiseg.data import simulate
from flmiseg.data import synthetic
from flmiseg.core.errors import UserError

flags.DEFINE_string('kind', 'er', "What to simulate: er, mito, nucleus, or all.")
flags.DEFINE_integer('num_train', 200, 'Training images.')
flags.DEFINE_integer('num_test', 20, 'Test images.')
flags.DEFINE_integer('size', 256, 'Image side, pixels.')
flags.DEFINE_integer('seed', 0, 'Random seed (same seed, same bytes).')
flags.DEFINE_string('out', None, 'Output folder (must be empty unless --overwrite).')
flags.DEFINE_bool('overwrite', False, 'Replace the contents of a non-empty --out.')
flags.DEFINE_string('randomize', '', "'' (each kind's fixed knobs), wide (knobs drawn per "
                    'image, for training) or shifted (a held-out test distribution).')
flags.DEFINE_string('masks', 'geometry', 'How masks are drawn: geometry (the structure before '
                    'blur) or visible (out to the half maximum of its blur).')
flags.mark_flag_as_required('out')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  kinds = simulate.KINDS if FLAGS.kind == 'all' else (FLAGS.kind,)
  try:
    if FLAGS.randomize not in ('',) + synthetic.RANDOMIZE:
      raise UserError(f'--randomize={FLAGS.randomize!r} is not a preset; valid: '
                      f'{", ".join(synthetic.RANDOMIZE)}')
    for kind in kinds:
      if kind not in simulate.KINDS:
        raise UserError(f'--kind={kind!r} is not a kind; valid: {", ".join(simulate.KINDS)}, '
                        'all')
      out = pathlib.Path(FLAGS.out) / kind if FLAGS.kind == 'all' else pathlib.Path(FLAGS.out)
      start = time.perf_counter()
      synthetic.write_dataset(kind, out, FLAGS.num_train, FLAGS.num_test, FLAGS.size,
                             FLAGS.seed, FLAGS.overwrite, randomize=FLAGS.randomize,
                             masks=FLAGS.masks)
      n = FLAGS.num_train + FLAGS.num_test
      print(f'{kind}: {n} images of {FLAGS.size}x{FLAGS.size} written to {out} '
            f'({n / (time.perf_counter() - start):.1f} images/s)')
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main)
