"""The training logs: metrics.jsonl, and a training curve drawn at most every
PLOT_EVERY_SECONDS during training and when the logger closes after new records."""

from flmiseg.core import logs


def test_curve_is_drawn_at_most_every_period_and_when_the_logger_closes(tmp_path,
                                                                        monkeypatch):
  clock = [100.0]
  monkeypatch.setattr(logs.time, 'monotonic', lambda: clock[0])
  logger = logs.MetricsLogger(tmp_path)
  curve = tmp_path / 'training_curve.png'

  logger.write(2, 'train', {'loss': 1.0})
  logger.write(2, 'val', {'iou': 0.5})
  clock[0] += logs.PLOT_EVERY_SECONDS - 1
  logger.plot()  # less than a period since the start: not drawn
  assert not curve.exists()
  clock[0] += 1
  logger.plot()  # a period since the start
  assert curve.exists()
  curve.unlink()

  logger.write(4, 'val', {'iou': 0.6})
  clock[0] += logs.PLOT_EVERY_SECONDS - 1
  logger.plot()  # too soon: not drawn
  assert not curve.exists()
  clock[0] += 1
  logger.plot()  # a period after the last drawing
  assert curve.exists()
  curve.unlink()

  logger.close()  # nothing new since the last drawing: not drawn again
  assert not curve.exists()

  logger = logs.MetricsLogger(tmp_path)  # a run shorter than a period: drawn once, at close
  logger.write(6, 'val', {'iou': 0.7})
  logger.plot()
  logger.write(8, 'val', {'iou': 0.8})
  logger.plot()
  assert not curve.exists()
  logger.close()
  assert curve.exists()
  assert [r['step'] for r in logger.read()] == [2, 2, 4, 6, 8]

  curve.unlink()
  logs.MetricsLogger(tmp_path).close()  # a rerun that logs nothing (already trained)
  assert not curve.exists()


def test_a_disabled_logger_writes_nothing(tmp_path):
  logger = logs.MetricsLogger(tmp_path, enabled=False)
  logger.write(1, 'val', {'iou': 0.5})
  logger.plot(force=True)
  logger.close()
  assert list(tmp_path.iterdir()) == []
