"""Instance AP of the distance head versus connected components of the same model.

  python -m experiments.instances --workdir=runs/instances [--seeds=0,1,2] [--steps=400]

Per seed: trains configs/nucleus_instances.py (width-16 U-Net with the distance head, 80
simulated 256x256 nucleus images, label-image masks, 400 steps) in WORKDIR/seed<k>, then
scores its test images (20 simulated images of that seed) twice from the same probabilities at
the same calibrated threshold: instances split by the distance head (flmiseg/objects/instances.py), and
the 8-connected components of the mask, which is what a semantic-only model gives. Matching
as StarDist's (flmiseg/objects/matching.py), pooled over the test set. Prints a Markdown table and
writes WORKDIR/instances.json.
"""

import json
import pathlib
import time

from absl import app
from absl import flags
import jax
import numpy as np

from flmiseg.evaluation import best_checkpoint
from flmiseg.evaluation import calibration
from flmiseg.core import console
from flmiseg.evaluation import evaluate
from flmiseg.inference import tiling
from flmiseg.objects import instances
from flmiseg.objects import matching
from flmiseg.core import sharding
from flmiseg.train import steps
from flmiseg.train import trainer
from flmiseg.configs import nucleus_instances
from flmiseg.data import loader

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Folder of the runs and results.')
flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds (each simulates its own data and model).')
flags.DEFINE_integer('steps', 400, 'Training steps per seed.')


def score(config, workdir) -> dict:
  """Pooled instance scores of the run's test set, distance head and connected components."""
  data = loader.load(config, workdir / 'cache', need_train=False)
  mesh = sharding.make_mesh()
  state, step = tiling.load(config, workdir, mesh)
  threshold = calibration.calibrated_threshold(workdir, step) or config.eval.threshold
  dynamic = best_checkpoint.seed_dynamic(config, calibration.read_calibration(workdir))
  predict = steps.jit_predict(config.eval.threshold)
  found = {'distance': [], 'connected_components': []}
  for i, outputs, _ in evaluate.predictions(predict, state, data.test, mesh,
                                            config.eval.batch_size):
    truth = data.test.label_image(i)
    mask = outputs[..., 0] > threshold
    found['distance'].append(matching.match(truth, instances.from_distance(
        mask, outputs[..., 1], dynamic, config.eval.min_size)))
    found['connected_components'].append(matching.match(
        truth, instances.connected_components(mask, config.eval.min_size)))
  return {name: matching.summary(matching.combine(rows)) for name, rows in found.items()}


def main(argv):
  del argv
  console.setup()
  root = pathlib.Path(FLAGS.workdir)
  results = {}
  for seed in map(int, FLAGS.seeds):
    config = nucleus_instances.get_config()
    config.seed = config.data.seed = seed  # each seed: its own simulated data and model
    config.train.num_steps = FLAGS.steps
    workdir = root / f'seed{seed}'
    start = time.perf_counter()
    summary = trainer.train_and_evaluate(config, workdir)
    seconds = time.perf_counter() - start
    results[seed] = {**score(config, workdir), 'seconds': seconds,
                     'pixel_iou': summary['calibrated']['iou'] if 'calibrated' in summary
                     else summary['iou']}
    print(f'seed {seed}: {json.dumps(results[seed])}', flush=True)
  (root / 'instances.json').write_text(json.dumps(results, indent=2) + '\n')
  keys = ('ap_0.5', 'ap_0.75', 'mean_ap', 'pq')
  print('\n| method | ' + ' | '.join(keys) + ' |\n|---|' + '---|' * len(keys))
  for name in ('distance', 'connected_components'):
    cells = []
    for key in keys:
      values = np.array([results[s][name][key] for s in results])
      cells.append(f'{values.mean():.3f} ± {values.std():.3f}')
    print(f'| {name} | ' + ' | '.join(cells) + ' |')
  margin = [results[s]['distance']['ap_0.5'] - results[s]['connected_components']['ap_0.5']
            for s in results]
  ious = ', '.join(f'{r["pixel_iou"]:.3f}' for r in results.values())
  seconds = ', '.join(f'{r["seconds"]:.0f} s' for r in results.values())
  print(f'\nAP@0.5 margin per seed: {", ".join(f"{m:+.3f}" for m in margin)}; pixel IoU '
        f'{ious}; train+eval {seconds} ({jax.devices()[0].device_kind})')


if __name__ == '__main__':
  flags.mark_flag_as_required('workdir')
  app.run(main)
