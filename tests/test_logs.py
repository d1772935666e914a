"""The training logs: metrics.jsonl, and a training curve drawn at most every
PLOT_EVERY_SECONDS during training and always when the logger closes."""

from flmiseg import logs


def test_curve_is_redrawn_at_most_every_period_and_when_the_logger_closes(tmp_path,
                                                                          monkeypatch):
  clock = [100.0]
  monkeypatch.setattr(logs.time, 'monotonic', lambda: clock[0])
  logger = logs.MetricsLogger(tmp_path)
  curve = tmp_path / 'training_curve.png'

  logger.write(2, 'train', {'loss': 1.0})
  logger.write(2, 'val', {'iou': 0.5})
  logger.plot()  # the first drawing: always
  first = curve.stat().st_mtime_ns
  curve.unlink()

  logger.write(4, 'val', {'iou': 0.6})
  clock[0] += logs.PLOT_EVERY_SECONDS - 1
  logger.plot()  # too soon: not drawn
  assert not curve.exists()
  clock[0] += 1
  logger.plot()  # a period after the first drawing
  assert curve.exists() and curve.stat().st_mtime_ns >= first
  curve.unlink()

  logger.close()  # nothing new since the last drawing: not drawn again
  assert not curve.exists()

  logger = logs.MetricsLogger(tmp_path)
  logger.write(6, 'val', {'iou': 0.7})
  logger.plot()
  curve.unlink()
  logger.write(8, 'val', {'iou': 0.8})
  logger.plot()  # too soon
  assert not curve.exists()
  logger.close()  # the last record is drawn
  assert curve.exists()
  assert [r['step'] for r in logger.read()] == [2, 2, 4, 6, 8]


def test_a_disabled_logger_writes_nothing(tmp_path):
  logger = logs.MetricsLogger(tmp_path, enabled=False)
  logger.write(1, 'val', {'iou': 0.5})
  logger.plot(force=True)
  logger.close()
  assert list(tmp_path.iterdir()) == []
