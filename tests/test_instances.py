"""Instance segmentation: label images from the simulator and from users, the distance head's
targets, its post-processing, its loss, and instances in eval and predict end to end."""

import csv
import functools
import json

from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tifffile

from flmiseg.objects import instances
from flmiseg.train import losses
from flmiseg import models
from flmiseg.cli import predict
from flmiseg.train import steps
from flmiseg.train import trainer
from flmiseg.configs import default
from flmiseg.data import dataset
from flmiseg.data import lists
from flmiseg.data import pipeline
from flmiseg.data import simulate
from flmiseg.data import synthetic
from flmiseg.core import sharding
from flmiseg.data import loader
from flmiseg.evaluation import evaluate
from flmiseg.store import checkpoint
from flmiseg.store import rundir
from flmiseg.store import settings
from tests import helpers


def _two_touching_squares():
  labels = np.zeros((12, 20), np.int32)
  labels[1:10, 1:10] = 1  # 9x9
  labels[1:10, 10:19] = 2  # 9x9, touching the first along a whole side
  return labels


def test_distance_target_exact():
  labels = np.zeros((9, 9), np.int32)
  labels[2:7, 2:7] = 4  # a 5x5 square: edge pixels at distance 1, ring 2, centre 3
  target = instances.distance_target(labels)
  assert target[4, 4] == 1.0
  np.testing.assert_allclose(target[2, 2:7], [1 / 3] * 5)
  np.testing.assert_allclose(target[3, 3:6], [2 / 3] * 3)
  assert (target[labels == 0] == 0).all() and target.dtype == np.float32


def test_distance_target_separates_touching_objects():
  labels = _two_touching_squares()
  target = instances.distance_target(labels)
  # Each square peaks at its own centre and falls to 1/5 at the shared edge (9x9: max 5).
  assert target[5, 5] == 1.0 and target[5, 14] == 1.0
  assert target[5, 9] == pytest.approx(0.2) and target[5, 10] == pytest.approx(0.2)
  # Binary masks: one component, so no valley at the shared edge.
  merged = instances.targets_from_mask(labels > 0, None)
  assert merged[5, 9] > 0.8


def test_from_distance_splits_touching_objects_deterministically():
  labels = _two_touching_squares()
  distance = instances.distance_target(labels)
  found = instances.from_distance(labels > 0, distance)
  assert found.dtype == np.uint16 and found.max() == 2
  # Exactly the two squares (up to label order).
  assert {(int(found[labels == k].min()), int(found[labels == k].max())) for k in (1, 2)} == {
      (1, 1), (2, 2)}
  np.testing.assert_array_equal(found, instances.from_distance(labels > 0, distance))
  # Connected components merge them.
  assert instances.connected_components(labels > 0).max() == 1


def test_from_distance_keeps_unseeded_objects_and_drops_small_ones():
  mask = np.zeros((20, 20), bool)
  mask[2:8, 2:8] = True  # seeded
  mask[12:14, 12:18] = True  # 12 px, no seed: its distance rises less than the dynamic
  mask[17, 1] = True  # 1 px
  distance = np.where(mask, 0.03, 0.0)
  distance[4:6, 4:6] = 0.9
  found = instances.from_distance(mask, distance, min_size=2)
  assert found.max() == 2
  assert len(np.unique(found[2:8, 2:8])) == 1 and len(np.unique(found[12:14, 12:18])) == 1
  assert found[17, 1] == 0 and (found[mask] > 0).sum() == mask.sum() - 1


def test_simulator_writes_label_images_with_the_same_union(tmp_path):
  out = synthetic.write_dataset('nucleus', tmp_path / 'n', 1, 0, size=160, seed=3)
  mask = tifffile.imread(out / 'train' / 'masks' / 'nucleus_00000.tif')
  assert mask.dtype == np.uint16 and mask.max() >= 2
  np.testing.assert_array_equal(np.unique(mask), np.arange(mask.max() + 1))  # no gaps
  _, binary = simulate.simulate('nucleus', 160, synthetic.image_rng(3, 'train', 0))
  np.testing.assert_array_equal(mask > 0, binary > 0)
  er = synthetic.write_dataset('er', tmp_path / 'e', 1, 0, size=64)
  assert tifffile.imread(er / 'train' / 'masks' / 'er_00000.tif').dtype == np.uint8


def test_label_masks_cached_with_ignored_pixels_removed(tmp_path):
  root = tmp_path / 'data'
  (root / 'images').mkdir(parents=True)
  (root / 'masks').mkdir()
  labels = np.zeros((16, 16), np.uint16)
  labels[1:5, 1:5] = 3
  labels[1:5, 5:9] = 7  # touches 3
  labels[10:14, 10:14] = 2  # the ignore value: unlabelled
  tifffile.imwrite(root / 'images' / 'a.tif', np.arange(256, dtype=np.uint16).reshape(16, 16))
  tifffile.imwrite(root / 'masks' / 'a.tif', labels)
  tifffile.imwrite(root / 'images' / 'b.tif', np.ones((16, 16), np.uint16))
  tifffile.imwrite(root / 'masks' / 'b.tif', (labels == 3).astype(np.uint8) * 255)  # binary
  source = dataset.prepare(lists.load_pairs(root), 'percentile', 'nucleus', tmp_path / 'c',
                           ignore_value=2, instance_targets=True)
  a, b = source.names.index('a'), source.names.index('b')
  assert source.has_labels and source.labels[b] == ''
  cached = source.label_image(a)
  np.testing.assert_array_equal(cached, np.where(labels == 2, 0, labels))
  assert source.valid_map(a)[11, 11] == 0
  # The binary mask's instances are its connected components.
  np.testing.assert_array_equal(source.label_image(b), (labels == 3).astype(np.int32))
  distance = source[a]['distance']
  np.testing.assert_array_equal(distance > 0, np.isin(labels, (3, 7)))
  # 4x4 squares: centre pixels at distance 2, edges 1; a valley where they touch.
  np.testing.assert_array_equal(distance[2, 1:9], [0.5, 1, 1, 0.5, 0.5, 1, 1, 0.5])


@pytest.mark.parametrize('groups', [(), ('scale', 'noise')])
def test_augment_keeps_distance_aligned_with_mask(groups):
  labels = np.zeros((64, 64), np.int32)
  yy, xx = np.mgrid[:64, :64]
  for k, (cy, cx, r) in enumerate([(20, 20, 9), (20, 36, 8), (45, 40, 12)], start=1):
    labels[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = k
  element = {'image': np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32),
             'mask': (labels > 0).astype(np.uint8),
             'distance': instances.distance_target(labels), 'index': 0}
  augment = pipeline.Augment(crop_size=48, groups=groups)
  for seed in range(6):
    out = augment.random_map(element, np.random.default_rng(seed))
    assert out['distance'].shape == (48, 48, 1) and out['distance'].dtype == np.float32
    np.testing.assert_array_equal(out['distance'] > 0, out['mask'] > 0)


class _State(train_state.TrainState):
  batch_stats: dict = None


def test_train_step_adds_the_weighted_distance_loss():
  config = default.get_config()
  config.model.width = 4
  config.model.instance_head = 'distance'
  model = models.create_model(config.model, jnp.float32)
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 1))
  # Jitted: run op by op, a U-Net's init, apply and train step take seconds each on a CPU.
  variables = jax.jit(model.init)(jax.random.key(1), x)
  logits, _ = jax.jit(model.apply)(variables, x)
  assert logits.shape == (2, 32, 32, 2)
  state = _State.create(apply_fn=model.apply, params=variables['params'],
                        batch_stats=variables['batch_stats'], tx=optax.sgd(0.0))
  rng = np.random.default_rng(0)
  batch = {'image': x, 'mask': jnp.asarray(rng.random((2, 32, 32, 1)) > 0.5, jnp.float32),
           'valid': jnp.ones((2, 32, 32, 1))}
  distance = jnp.asarray(rng.random((2, 32, 32, 1)), jnp.float32)
  kwargs = dict(schedule=lambda _: 0.0, dropout_key=jax.random.key(2))
  # The instance head's loss is the registered loss 'distance' (losses.from_config adds it
  # with config.train.instance_weight).
  step = jax.jit(functools.partial(steps.train_step, loss_fn=losses.bce, **kwargs))
  head_step = jax.jit(functools.partial(
      steps.train_step, loss_fn=losses.make_loss('bce+distance', (1.0, 0.5)), **kwargs))
  _, plain = step(state, batch)
  _, with_head = head_step(state, {**batch, 'distance': distance})
  # Training mode normalises with the batch statistics: the logits of the step itself.
  train_logits, _ = jax.jit(functools.partial(model.apply, train=True, mutable=['batch_stats']))(
      variables, x)[0]
  expected = 0.5 * losses.bce(train_logits[..., 1:2], distance)
  assert float(with_head['loss'] - plain['loss']) == pytest.approx(float(expected), rel=1e-5)
  assert float(plain['loss']) == pytest.approx(
      float(losses.bce(train_logits[..., :1], batch['mask'])), rel=1e-5)


def test_unknown_instance_head_is_one_line():
  config = default.get_config()
  config.model.instance_head = 'stardist'
  with pytest.raises(Exception, match=r"config.model.instance_head='stardist'"):
    models.create_model(config.model, jnp.float32)


@pytest.fixture(scope='module')
def instance_run(tmp_path_factory):
  root = tmp_path_factory.mktemp('instances')
  data = helpers.write_blob_dataset(root / 'data', num_train=8, num_test=3, labels=True)
  config = helpers.tiny_config(data, **{'train.num_steps': 40, 'eval.every_steps': 20,
                                         'optim.lr': 1e-2, 'model.instance_head': 'distance',
                                         'eval.min_size': 4})
  summary = trainer.train_and_evaluate(config, root / 'work')
  return data, root / 'work', summary


def test_eval_reports_instances(instance_run):
  _, work, summary = instance_run
  found = summary['instances']
  assert found['method'] == 'distance'
  stored = json.loads((work / 'eval' / 'summary.json').read_text())['instances']
  assert stored == found
  with open(work / 'eval' / 'per_image.csv') as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 3 and all('ap_0.5' in r and 'pq' in r for r in rows)
  # The pooled counts are the per-image ones added up: recall at 0.5 = sum tp / sum true.
  true = sum(int(r['num_true']) for r in rows)
  tp = sum(float(r['recall_0.5']) * int(r['num_true']) for r in rows)
  assert found['recall_0.5'] == pytest.approx(tp / true)
  assert '## Instances' in (work / 'eval' / 'report.md').read_text()
  # The seeds' dynamic was calibrated on the validation split: the best of the grid there.
  calibration = json.loads((work / 'calibration.json').read_text())
  scores = calibration['seed_dynamic_ap_0.5']
  assert found['seed_dynamic'] == calibration['seed_dynamic']
  assert scores[f'{calibration["seed_dynamic"]:g}'] == max(scores.values())
  assert set(scores) == {f'{h:g}' for h in instances.DYNAMIC_GRID}


def test_validation_scores_instances_and_the_best_follows_the_score(instance_run):
  """Each validation of the instance model logs its IoU, its pooled instance AP@0.5 (what the
  test-set evaluation computes on the same images, weights and settings) and their mean; the
  best checkpoint is the one with the highest mean."""
  _, work, summary = instance_run
  records = [json.loads(l) for l in (work / 'metrics.jsonl').read_text().splitlines()]
  vals = {r['step']: r for r in records if r['kind'] == 'val'}
  assert sorted(vals) == [20, 40]
  for r in vals.values():
    assert r['score'] == (r['iou'] + r['ap_0.5']) / 2 and 0 <= r['ap_0.5'] <= 1
  assert summary['checkpoint_step'] == -max((r['score'], -s) for s, r in vals.items())[1]
  # The last validation, again through the test-set evaluation of the last checkpoint.
  config = rundir.read_config(work)
  data = loader.load(config, work / 'cache')
  ckpt = checkpoint.Checkpointer(work, read_only=True)
  state, _, _ = ckpt.restore_last(checkpoint.abstract(
      trainer.build(config, (32, 32), len(data.train)).state))
  ckpt.close()
  found = evaluate.evaluate(steps.jit_predict(config.eval.threshold), state, data.val,
                            sharding.make_mesh(), 8, config.eval.threshold, min_size=4,
                            dynamic=settings.configured_dynamic(config))
  assert found['instances']['ap_0.5'] == pytest.approx(vals[40]['ap_0.5'], abs=1e-12)
  assert found['iou'] == pytest.approx(vals[40]['iou'], abs=1e-6)


def test_predict_writes_instances_and_objects(instance_run, tmp_path):
  data, work, _ = instance_run
  config = json.loads((work / 'config.json').read_text())
  run_config = rundir.read_config(work)
  image = data / 'test' / 'images' / 'test_000.tif'
  options = predict.Options(input=str(image), output=str(tmp_path / 'out'), instances=True,
                            min_size=4, pixel_size=0.5)
  predict.run(run_config, work, options)
  labels = tifffile.imread(tmp_path / 'out' / 'test_000_instances.tif')
  mask = tifffile.imread(tmp_path / 'out' / 'test_000_mask.tif')
  assert labels.dtype == np.uint16 and config['model']['instance_head'] == 'distance'
  assert ((labels > 0) <= (mask > 0)).all()
  with open(tmp_path / 'out' / 'test_000_objects.csv') as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == labels.max()
  raw = tifffile.imread(image).astype(np.float64)
  for row in rows:
    region = labels == int(row['label'])
    assert float(row['area_um2']) == pytest.approx(region.sum() * 0.25)
    assert float(row['centroid_y_um']) == pytest.approx(np.argwhere(region)[:, 0].mean() * 0.5)
    assert float(row['mean_intensity']) == pytest.approx(raw[region].mean())
