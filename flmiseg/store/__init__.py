"""What a trained model is on disk, read and written: the run directory and the packed model.

  rundir.py      a run directory is the model: its config, input statistics, inference fields
  checkpoint.py  orbax checkpoints of the train state (the best one kept)
  weights.py     the variables inference loads (a run's best checkpoint or a packed model),
                 and packing a run
  pretrained.py  the packed format and the shipped models (er, mito, nucleus)
  settings.py    the threshold and instance settings: given, else calibrated
                 (calibration.json), else the config's

May import flmiseg.data, models, objects, configs and core; never inference or anything above.
"""
