"""Fine-tuning: a training that starts from a trained model (config.train.init_from).

`adopt_source_settings` gives the config the source model's preprocessing and instance head
(and its object diameter), before the data is loaded; `initialize_from` puts the source's
weights into the fresh train state. The source is a shipped model's name, or a run or packed
folder (flmiseg/store/pretrained.py).
"""

from absl import logging

from flmiseg.core.errors import UserError
from flmiseg.data import preprocess
from flmiseg.store import pretrained
from flmiseg.store import rundir
from flmiseg.store import weights


def source_model(config):
  """(folder, config) of the model config.train.init_from names."""
  folder = rundir.check_trained(pretrained.resolve_model(config.train.init_from,
                                                         'config.train.init_from'))
  return folder, rundir.read_config(folder)


def adopt_source_settings(config) -> None:
  """With config.train.init_from, sets config.data.kind and .normalization to the source
  model's when they would give its weights other inputs than it was trained on, and
  config.model.instance_head to the source's (a one-line warning says so for each):
  fine-tuning a nucleus model must see nucleus preprocessing and keep its instance head. A
  config that records no object diameter takes the source's (config.data.object_diameter),
  so predict's --diameter works on the fine-tuned model as on its source."""
  _, source = source_model(config)
  if not config.data.get('object_diameter') and source.data.get('object_diameter'):
    config.data.object_diameter = source.data.object_diameter
  head = source.model.get('instance_head', '')
  if config.model.get('instance_head', '') != head:
    logging.warning('config.train.init_from=%s: using its instance head (%r) instead of %r',
                    config.train.init_from, head, config.model.get('instance_head', ''))
    config.model.instance_head = head
  resolve = lambda data: preprocess.resolve(data.normalization, data.kind)
  if resolve(source.data) != resolve(config.data):
    logging.warning('config.train.init_from=%s: using its preprocessing (kind %s, '
                    'normalization %s) instead of %s/%s', config.train.init_from,
                    source.data.kind, source.data.normalization, config.data.kind,
                    config.data.normalization)
    config.data.kind, config.data.normalization = source.data.kind, source.data.normalization


def initialize_from(config, state, mesh):
  """`state` with the params and batch_stats of config.train.init_from (a shipped model's
  name, or a run or packed folder), for fine-tuning; the optimizer state stays fresh. The
  preprocessing was matched before by `adopt_source_settings`."""
  folder, source = source_model(config)
  mine = rundir.flatten(config.model.to_dict())
  for key, value in rundir.flatten(source.model.to_dict()).items():
    if mine.get(key) != value:
      raise UserError(f'config.train.init_from={config.train.init_from}: its '
                      f'config.model.{key}={value!r}, this run\'s is {mine.get(key)!r}; '
                      'fine-tuning needs the same architecture')
  loaded, step = weights.load(source, folder, mesh)
  logging.info('Initialised from %s (step %d)', folder, step)
  return state.replace(params=loaded.params, batch_stats=loaded.batch_stats)
