"""Evaluation: the prediction loop over a dataset and the test-set evaluation (evaluate.py),
the per-image metrics (metrics.py), the threshold calibration (calibration.py), the reports
(report.py), and a run's best checkpoint restored, calibrated and evaluated
(best_checkpoint.py). May import inference, store, data, models, objects and core; never
train, export or cli (their predict step is passed in).
"""
