"""What a bioimage.io package loses where the spec cannot express flmiseg's preprocessing.

  python -m experiments.benchmarks.export_loss [--models=er,mito,nucleus] [--num_images=8] \
      [--seed=7]

For each model (shipped name or run folder), simulated test images of its kind (default knobs,
256x256, seed --seed; never seen in training) are segmented twice by the same float32 network
(`flmiseg.export.onnx_graph.forward`), at the model's calibrated threshold: after flmiseg's own
normalisation (percentile scaling for the shipped models, CLAHE for the paper's recipe) and
after the package's closest expressible one
(`flmiseg.export.bioimage.preprocessing_steps`, computed as bioimage.io computes it). Prints
the mean IoU of both against the true masks, as JSON.
"""

import json

from absl import app
from absl import flags
import jax
import numpy as np

from flmiseg.export import bioimage
from flmiseg.core import console
from flmiseg.export import onnx_graph
from flmiseg.evaluation import metrics
from flmiseg.inference import model as model_lib
from flmiseg.data import loader
from flmiseg.data import preprocess
from flmiseg.data import simulate
from flmiseg.data import synthetic

flags.DEFINE_list('models', ['er', 'mito', 'nucleus'], 'Shipped models or run folders.')
flags.DEFINE_integer('num_images', 8, 'Simulated test images per model.')
flags.DEFINE_integer('seed', 7, 'Seed of the simulated images.')
FLAGS = flags.FLAGS


def measure(model: str, num_images: int, seed: int) -> dict:
  """{'flmiseg_iou', 'package_iou', 'normalization', 'package_preprocessing', ...}."""
  loaded = model_lib.load(model, devices=jax.local_devices()[:1])
  config, threshold = loaded.config, loaded.threshold
  probs = onnx_graph.forward(loaded)
  steps, exact = bioimage.preprocessing_steps(config)
  kind = config.data.kind if config.data.kind in simulate.KINDS else 'er'
  scores = {'flmiseg': [], 'package': []}
  for i in range(num_images):
    image, mask = simulate.simulate(kind, 256, synthetic.image_rng(seed, 'test', i),
                                    masks=loader.synthetic_masks(config.data))
    inputs = {'flmiseg': preprocess.normalize(image, config.data.normalization, config.data.kind),
              'package': bioimage.apply_steps(image, steps)}
    for name, x in inputs.items():
      prob = np.asarray(probs(x[None, ..., None]))[0, ..., 0]
      scores[name].append(metrics.mask_iou(prob > threshold, mask > 0))
  return {'model': model, 'normalization': preprocess.resolve(config.data.normalization,
                                                              config.data.kind),
          'package_preprocessing': bioimage.describe_steps(steps), 'exact': exact,
          'threshold': threshold, 'num_images': num_images,
          'flmiseg_iou': float(np.mean(scores['flmiseg'])),
          'package_iou': float(np.mean(scores['package']))}


def main(argv):
  del argv
  console.setup()  # progress and results only; no library log lines
  for model in FLAGS.models:
    print(json.dumps(measure(model, FLAGS.num_images, FLAGS.seed), sort_keys=True))


if __name__ == '__main__':
  app.run(main)
