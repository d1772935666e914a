"""The config of a trained run, read from its DIR/config.json (a config file for
ml_collections' config_flags, which passes DIR as the argument after the colon).

flmiseg.main adds `--config=<this file>:DIR` for --mode=eval|predict|summary when --config is
not given, so `--config.eval.batch_size=4`-style overrides of inference settings work there.
"""

from flmiseg.store import rundir


def get_config(workdir: str):
  return rundir.read_config(workdir)
