"""The prediction loop over a prepared source, and the test-set evaluation.

`predictions` batches a source's images in order and pads the last batch with masked entries,
so every image counts exactly once whatever the batch size; the predict step
(`steps.predict_step`) returns each image's outputs and its confusion counts at the fixed
threshold, computed on device. A training's validation (`validation_scores`) needs nothing
more, except for a model with an instance head on label images: the instance AP@0.5 of its
outputs, matched on the host as the test set's are (`match_instances`). Each image's padding
pixels are excluded, and so are the pixels a sparse mask leaves unlabelled
(config.data.ignore_value): from the counts, the calibration (flmiseg/evaluation/calibration.py), every
host-side metric and the errors drawn in worst_best.png.

`evaluate` scores the test set: the per-image metrics the reference reports (IoU, F1, Dice,
accuracy, precision, recall, AUC at threshold 0.5) plus the rest of `flmiseg.evaluation.metrics`, at
config.eval.threshold and, with a calibration, at the calibrated threshold; the instance
scores (flmiseg/objects/matching.py) when the masks are label images. The overlap metrics at the fixed
threshold come from the device's counts; each image's mask is read from the cache once, and
its AUC, Hausdorff distances, clDice, Betti errors, instances, calibrated-threshold metrics and
worst_best.png errors all use that one read. flmiseg/evaluation/report.py writes the files. On several
processes, process 0 alone computes the host-side metrics and shares them.
"""

from absl import logging
import jax
import numpy as np

from flmiseg.core import files
from flmiseg.inference import tiling
from flmiseg.objects import instances
from flmiseg.objects import matching
from flmiseg.evaluation import metrics
from flmiseg.evaluation import report
from flmiseg.core import sharding
from flmiseg.data import dataset
from flmiseg.data import pipeline


def predictions(predict, state, source, mesh, batch_size: int, with_probs: bool = True):
  """Yields (index, outputs (h, w, C) or None, counts dict) per image of `source`, in order.

  outputs[..., 0] is the foreground probability; a model with an instance head adds
  outputs[..., 1], its predicted normalised distance. counts holds the image's 'tp', 'fp',
  'fn', 'tn' (ints) from the predict step, at the threshold bound to it.
  """
  # Any batch size works on any number of devices: round up, the padding is masked.
  batch_size = tiling.round_up_batch(batch_size, jax.device_count())
  for batch in pipeline.eval_batches(source, global_batch=batch_size,
                                     process_index=jax.process_index(),
                                     process_count=jax.process_count()):
    present = batch.pop('present')
    index = batch.pop('index')
    probs, counts = predict(state, sharding.global_batch(batch, mesh))
    counts = sharding.to_host(counts)
    probs = sharding.to_host(probs) if with_probs else None
    if jax.process_count() > 1:
      present = sharding.to_host(sharding.global_batch({'p': present}, mesh))['p']
      index = sharding.to_host(sharding.global_batch({'i': index}, mesh))['i']
    for j in np.flatnonzero(present):
      i = int(index[j])
      h, w = source.shapes[i]
      prob = probs[j, :h, :w] if with_probs else None
      yield i, prob, {k: int(v[j]) for k, v in counts.items()}


def drain(outputs) -> None:
  """Runs a `predictions` loop without the host-side work: on processes other than 0, which
  must take part in its collectives."""
  for _ in outputs:
    pass


def validation_iou(predict, state, source, mesh, batch_size: int) -> float:
  """Mean per-image IoU over `source` at the predict step's threshold."""
  return validation_scores(predict, state, source, mesh, batch_size)['iou']


def validation_scores(predict, state, source, mesh, batch_size: int,
                      instances_at: tuple[float, float, int] | None = None) -> dict:
  """What a training validates on `source` (its validation split), in one prediction pass.

  Returns {'iou': the mean per-image IoU at the predict step's threshold, from the device's
  counts}; with `instances_at` = (threshold, seed dynamic, min size), the predict step's
  threshold and the instance settings of `instances.from_outputs`, also 'ap_0.5': the
  instance AP at IoU 0.5 pooled over the images (`matching.combine`), as `evaluate` scores the
  test set. The instances are matched on the host, by process 0 alone, which shares the AP.
  """
  primary, rows, matches = files.is_primary(), [], []
  for i, output, counts in predictions(predict, state, source, mesh, batch_size,
                                       with_probs=instances_at is not None):
    rows.append(counts)
    if instances_at is not None and primary:
      matches.append(match_instances(source, i, output, *instances_at, valid_map(source, i),
                                     thresholds=(0.5,)))
  counts = {k: np.array([r[k] for r in rows]) for k in metrics.COUNT_NAMES}
  scores = {'iou': float(np.mean(metrics.overlap_metrics(**counts)['iou']))}
  if instances_at is not None:
    ap = matching.combine(matches)[0]['ap'] if primary else None
    scores['ap_0.5'] = float(sharding.from_primary(ap))
  return scores


# ------------------------------------------------------------------ ground truth

def valid_map(source, index: int) -> np.ndarray | None:
  """(H, W) bool of image `index`, False on the pixels its mask leaves unlabelled
  (config.data.ignore_value); None when it has none (every pixel counts)."""
  read = getattr(source, 'valid_map', None)  # sources without ignored pixels lack it
  return read(index) if read else None


def ground_truth(source, index: int) -> tuple[np.ndarray, np.ndarray | None]:
  """(mask (H, W) in {0, 1}, `valid_map`) of image `index`: one read of its cached mask."""
  return dataset.load_array(source.files[index][1]), valid_map(source, index)


def instance_truth(source, index: int, mask: np.ndarray | None = None) -> np.ndarray:
  """int32 (H, W) true instances of image `index` (`PreparedSource.label_image`).

  Args:
    source: a PreparedSource.
    index: the image.
    mask: its cached mask (`ground_truth`), if already read: an image without a label image
      then gets the 8-connected components of it instead of a second read.
  """
  if mask is None or (source.labels and source.labels[index]):
    return source.label_image(index)
  return instances.connected_components(mask).astype(np.int32)


def match_instances(source, index: int, output: np.ndarray, threshold: float, dynamic: float,
                    min_size: int, valid: np.ndarray | None, mask=None,
                    thresholds=matching.THRESHOLDS) -> list[dict]:
  """`matching.match` of image `index`'s predicted instances against its true ones.

  Args:
    source: a PreparedSource.
    index: the image.
    output: (h, w, C) its model outputs (`predictions`).
    threshold, dynamic, min_size: `instances.from_outputs`'s.
    valid: its `valid_map` (None: every pixel counts).
    mask: its cached mask, if already read (`instance_truth`).
    thresholds: the IoU thresholds to match at.
  """
  found = instances.from_outputs(output, threshold, dynamic, min_size)
  return matching.match(instance_truth(source, index, mask), found, thresholds, valid=valid)


# ------------------------------------------------------------------ test-set evaluation

def image_row(prob: np.ndarray, target: np.ndarray, valid: np.ndarray | None,
              threshold: float, counts: dict | None = None,
              auc: float | None = None) -> dict:
  """`metrics.image_metrics(prob, target, threshold, valid)` of one image, the same keys in
  the same order and the same values, from what is already known of it.

  Args:
    prob: (H, W) foreground probabilities (the real pixels).
    target: (H, W) ground truth in {0, 1}.
    valid: (H, W) bool labelled pixels, or None (all).
    threshold: foreground where prob > threshold.
    counts: the image's 'tp', 'fp', 'fn', 'tn' at `threshold` (the predict step's), or None
      to count on the host. Counts for another threshold (tp + fp is not the number of
      labelled pixels above `threshold`) are replaced by host counts, with a warning.
    auc: the image's AUC when already computed (it does not depend on the threshold).
  """
  if counts is not None:
    keep = np.ones(target.shape, bool) if valid is None else np.asarray(valid) > 0.5
    predicted = int(np.count_nonzero((prob > threshold) & keep))
    # Thresholds are nested: the same number of pixels above two thresholds means the same
    # pixels, so this one check makes the device counts exactly the host's.
    if counts['tp'] + counts['fp'] != predicted:
      logging.warning('The predict step\'s counts are not at threshold %g (%d predicted '
                      'pixels, not %d): counting on the host', threshold,
                      counts['tp'] + counts['fp'], predicted)
      counts = None
  return metrics.image_metrics(prob, target, threshold, valid, counts=counts, auc_value=auc)


def _score_images(outputs, source, threshold: float, tuned: float | None, extremes,
                  dynamic: float, min_size: int) -> tuple[list, list, list, int]:
  """(rows, tuned_rows, instance matches, channels) of every image `outputs` yields; adds
  each image's prediction at the shown threshold to `extremes`."""
  rows, tuned_rows, matches, channels = [], [], [], 1
  shown_at = threshold if tuned is None else tuned
  with_instances = getattr(source, 'has_labels', False)
  for i, output, counts in outputs:
    prob, channels = output[..., 0], output.shape[-1]
    target, valid = ground_truth(source, i)
    row = image_row(prob, target, valid, threshold, counts=counts)
    rows.append({'name': source.names[i], **row})
    if tuned is not None:
      tuned_rows.append(row if tuned == threshold else
                        image_row(prob, target, valid, tuned, auc=row['auc']))
    if with_instances:
      matches.append(match_instances(source, i, output, shown_at, dynamic, min_size, valid,
                                     target))
      rows[-1].update(matching.summary(matches[-1]))
      rows[-1].update(num_true=matches[-1][0]['n_true'], num_found=matches[-1][0]['n_pred'])
    # Unlabelled pixels are neither right nor wrong: the figure draws no error there.
    pred = prob > shown_at if valid is None else (prob > shown_at) & valid
    extremes.add(i, (row if tuned is None else tuned_rows[-1])['iou'], pred, target > 0.5)
  return rows, tuned_rows, matches, channels


def evaluate(predict, state, source, mesh, batch_size: int, threshold: float,
             out_dir=None, extra: dict | None = None, calibration: dict | None = None,
             num_extremes: int = 3, dynamic: float = instances.SEED_DYNAMIC,
             min_size: int = 0) -> dict:
  """Every metric per image and over the set; writes the report files into `out_dir`.

  With several processes, process 0 alone computes the metrics on the host and writes the
  files (flmiseg/evaluation/report.py); every process returns its summary.

  Args:
    predict: the predict step with `threshold` bound (`steps.jit_predict(threshold)`): its
      counts give the overlap metrics at `threshold`.
    threshold: the fixed threshold (config.eval.threshold) of the main summary.
    out_dir: where summary.json, per_image.csv, report.md and worst_best.png go (None: none).
    extra: entries added to the summary (e.g. the checkpoint's step).
    calibration: a `calibration.calibrate` result; its threshold gives summary['calibrated'].
    num_extremes: how many worst and best images worst_best.png shows.
    dynamic, min_size: instance post-processing (`instances.from_outputs`).

  Returns:
    The summary: `metrics.summarize` at `threshold`, 'num_images', 'threshold', `extra`, and
    with a calibration 'calibrated': {'threshold', 'metric', and the same metrics}. When some
    test mask is a label image, 'instances': `matching.summary` of the predicted instances
    (at the calibrated threshold if any) against the true ones over the whole set, with the
    method ('distance' or 'connected_components') and threshold; the per-image rows then get
    the same scores of their own image.
  """
  outputs = predictions(predict, state, source, mesh, batch_size)
  if not files.is_primary():  # process 0 computes the metrics and writes the files
    drain(outputs)
    return sharding.from_primary(None)
  tuned = None if calibration is None else float(calibration['threshold'])
  shown_at = threshold if tuned is None else tuned
  extremes = report.Extremes(num_extremes)
  rows, tuned_rows, matches, channels = _score_images(outputs, source, threshold, tuned,
                                                      extremes, dynamic, min_size)
  summary = metrics.summarize(rows)
  summary['num_images'] = len(rows)
  summary['threshold'] = threshold
  summary.update(extra or {})
  if tuned is not None:
    summary['calibrated'] = {'threshold': tuned, 'metric': calibration['metric'],
                             **metrics.summarize(tuned_rows)}
  if getattr(source, 'has_labels', False):
    method = 'distance' if channels > 1 else 'connected_components'
    summary['instances'] = {**matching.summary(matching.combine(matches)),
                            'method': method, 'threshold': shown_at}
    if channels > 1:
      summary['instances']['seed_dynamic'] = dynamic
  if out_dir is not None:
    report.write_files(out_dir, rows, summary, calibration, source, extremes.selection(),
                       shown_at)
  return sharding.from_primary(summary)
