"""Evaluation over a prepared source: validation IoU during training, and the full report
(DIR/eval/summary.json, DIR/eval/per_image.csv) on the test set.

Images are batched in order and the last batch padded with masked entries, so every image
counts exactly once whatever the batch size; each image's padding pixels are excluded.
The per-image metrics are those the reference reports (IoU, F1, Dice, accuracy, precision,
recall, AUC at threshold 0.5), plus the rest of `flmiseg.metrics`.
"""

import csv
import json
import pathlib

import jax
import numpy as np

from flmiseg import metrics
from flmiseg import sharding
from flmiseg.data import pipeline

SUMMARY_KEYS = ('iou', 'f1', 'dice', 'accuracy', 'precision', 'recall', 'auc')


def predictions(predict, state, source, mesh, batch_size: int, with_probs: bool = True):
  """Yields (index, prob (h, w) or None, counts dict) per image of `source`, in order."""
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
      prob = probs[j, :h, :w, 0] if with_probs else None
      yield i, prob, {k: int(v[j]) for k, v in counts.items()}


def validation_iou(predict, state, source, mesh, batch_size: int) -> float:
  """Mean per-image IoU over `source` at the predict step's threshold."""
  rows = [c for _, _, c in predictions(predict, state, source, mesh, batch_size, False)]
  counts = {k: np.array([r[k] for r in rows]) for k in ('tp', 'fp', 'fn', 'tn')}
  return float(np.mean(metrics.overlap_metrics(**counts)['iou']))


def evaluate(predict, state, source, mesh, batch_size: int, threshold: float,
             out_dir=None, extra: dict | None = None) -> dict:
  """Every metric per image and over the set; writes summary.json and per_image.csv.

  `extra` entries (e.g. the checkpoint's step) are added to the summary.
  """
  rows = []
  for i, prob, _ in predictions(predict, state, source, mesh, batch_size):
    target = np.load(source.files[i][1])
    row = metrics.image_metrics(prob, target, threshold=threshold)
    rows.append({'name': source.names[i], **row})
  summary = metrics.summarize(rows)
  summary['num_images'] = len(rows)
  summary['threshold'] = threshold
  summary.update(extra or {})
  if out_dir is not None:
    write_report(rows, summary, out_dir)
  return summary


def write_report(rows: list[dict], summary: dict, out_dir) -> None:
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / 'summary.json').write_text(json.dumps(summary, indent=2, sort_keys=True) + '\n')
  fields = ['name'] + [k for k in rows[0] if k != 'name'] if rows else ['name']
  with open(out_dir / 'per_image.csv', 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)


def format_table(summary: dict) -> str:
  """A two-column text table of the reference's summary metrics."""
  lines = [f'{"metric":<12}{"value":>10}', '-' * 22]
  for key in SUMMARY_KEYS:
    if key in summary:
      lines.append(f'{key:<12}{summary[key]:>10.4f}')
  return '\n'.join(lines)
