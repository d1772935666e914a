"""The variables of a trained model, read for inference, and a run packed into a model folder.

`load(config, folder, mesh)` restores only `params` and `batch_stats`, of the best checkpoint
of a run (flmiseg/store/checkpoint.py) or of a packed model's weights.msgpack
(flmiseg/store/pretrained.py), into a shape-only target: no optimizer state is built or
compiled, and nothing depends on the training batch size or on how many devices trained the
model. `pack(run, out)` writes a run's variables as a packed model.
"""

import json
import pathlib
import shutil
from typing import Any, Callable

from flax import serialization
import flax
import jax
import jax.numpy as jnp
import numpy as np

from flmiseg import models
from flmiseg.core import files
from flmiseg.core import sharding
from flmiseg.core.errors import UserError
from flmiseg.store import checkpoint
from flmiseg.store import pretrained
from flmiseg.store import rundir
from flmiseg.store import settings

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
STORAGE_DTYPES = ('float16', 'float32')  # of a packed model's weights.msgpack


@flax.struct.dataclass
class InferenceState:
  """What `steps.predict_step` needs of a train state: the model and its variables."""
  apply_fn: Callable = flax.struct.field(pytree_node=False)
  params: Any
  batch_stats: Any


def compute_dtype(config):
  """The jnp dtype the network computes in (config.train.dtype)."""
  if config.train.dtype not in DTYPES:
    raise ValueError(f'config.train.dtype={config.train.dtype!r}; valid: {", ".join(DTYPES)}')
  return DTYPES[config.train.dtype]


def abstract_variables(model, hw: tuple[int, int]) -> dict:
  """Shapes and dtypes of {'params', 'batch_stats'} of `model` (nothing is computed)."""
  key = jax.random.key(0)
  variables = jax.eval_shape(lambda: model.init({'params': key, 'dropout': key},
                                                jnp.zeros((1, *hw, 1)), train=False))
  return {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}


def load(config, folder, mesh) -> tuple[InferenceState, int]:
  """(weights of the best checkpoint of the run or packed model `folder`, replicated over
  `mesh`; its step). Raises UserError when there is none, or when a packed model's file is
  damaged or does not fit `config`'s model."""
  model = models.create_model(config.model, compute_dtype(config))
  crop = config.data.crop_size
  abstract = abstract_variables(model, (crop, crop))
  if pretrained.is_packed(folder):
    variables, step = pretrained.load_variables(folder, abstract)
    variables = sharding.replicate(variables, mesh)
  else:
    rep = sharding.replicated(mesh)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                          abstract)
    restored = checkpoint.restore_best_variables(folder, target)
    if restored is None:
      raise UserError(f'{folder}: no trained checkpoint (train first with --mode=train)')
    variables, step = restored
  return InferenceState(model.apply, variables['params'], variables['batch_stats']), step


def pack(workdir, out, dtype: str = 'float16', provenance: dict | None = None) -> dict:
  """Writes the packed model (flmiseg/store/pretrained.py) of the trained run `workdir` into
  the folder `out`: its best checkpoint's variables stored as `dtype`, and its config,
  calibration and input statistics. Returns weights.json's content. Refuses a non-empty
  `out`."""
  if dtype not in STORAGE_DTYPES:
    raise UserError(f'dtype={dtype!r}; valid: {", ".join(STORAGE_DTYPES)}')
  workdir, out = rundir.check_trained(workdir), pathlib.Path(out)
  if out.exists() and any(out.iterdir()):
    raise UserError(f'{out}: not empty; choose another folder')
  config = rundir.read_config(workdir)
  state, step = load(config, workdir, sharding.make_mesh(jax.local_devices()[:1]))
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  host = jax.tree.map(lambda a: np.asarray(a).astype(dtype), jax.device_get(variables))
  out.mkdir(parents=True, exist_ok=True)
  (out / pretrained.WEIGHTS_FILE).write_bytes(serialization.msgpack_serialize(
      serialization.to_state_dict(host)))
  for name in (rundir.CONFIG_FILE, settings.CALIBRATION_FILE, rundir.STATS_FILE):
    if (workdir / name).is_file():
      shutil.copyfile(workdir / name, out / name)
  init_from = config.train.init_from
  if init_from:
    # A packed model is self-contained: the run it started from (a folder on the machine that
    # trained it) is recorded in weights.json, not left in the config for code to follow.
    saved = json.loads((workdir / rundir.CONFIG_FILE).read_text())
    saved['train']['init_from'] = ''
    files.write_json_atomic(out / rundir.CONFIG_FILE, saved)
  info = {'sha256': pretrained.sha256(out / pretrained.WEIGHTS_FILE), 'dtype': dtype,
          'step': step, 'params': int(sum(np.size(a) for a in jax.tree.leaves(host['params']))),
          **({'init_from': init_from} if init_from else {}), **(provenance or {})}
  (out / pretrained.WEIGHTS_INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + '\n')
  return info
