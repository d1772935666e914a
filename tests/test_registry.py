"""Extending flmiseg from outside the package: registries, config.imports, fusion_kwargs,
backbone_kwargs, aux.

The end-to-end case is issue 15's done-when, grown by issue 32: a fusion operator, an encoder,
a pixel loss and a loss that sees the model's outputs and the batch, written in a file outside
the repository, train the lowlevel model from the command line, and a run directory never
imports that file on its own.
"""

import json
import math
import os
import pathlib
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flmiseg.store import weights
from flmiseg.train import losses
from flmiseg import models
from flmiseg.core import registry
from flmiseg.store import rundir
from flmiseg.core import sharding
from flmiseg.train import config_checks
from flmiseg.train import steps
from flmiseg.train import trainer
from flmiseg.configs import default
from flmiseg.core.errors import UserError
from flmiseg.models import backbones
from flmiseg.models import fusion
from tests import helpers

BUILTIN_FUSIONS = ['add', 'attention_gate', 'concat', 'se_concat', 'weighted_sum']

# A user's file: a fusion operator with a hyper-parameter that sets its parameters' shapes, an
# encoder with a setting (backbone_kwargs), and two losses whose values show in the training
# log: a pixel loss and one that reads the outputs (aux) and the batch.
USER_FILE = '''
    """My fusion research, outside flmiseg."""
    from typing import Any

    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from flmiseg import models
    from flmiseg.train import losses
    from flmiseg.models import fusion
    from flmiseg.models import layers


    @fusion.register_fusion('mixed_concat')
    class MixedConcat(nn.Module):
      """[skip, decoder] mixed by a 1x1 convolution to `features` channels."""
      features: int = 4
      dtype: Any = jnp.float32

      @nn.compact
      def __call__(self, decoder, skip, train: bool = False):
        decoder = layers.resize_to(decoder, skip.shape[1:3])
        x = jnp.concatenate([skip, decoder.astype(skip.dtype)], axis=-1).astype(self.dtype)
        return layers.Conv(self.features, (1, 1), dtype=self.dtype, name='mix')(x)


    @losses.register_loss('offset_bce')
    def offset_bce(logits, targets, valid=None):
      return losses.bce(logits, targets, valid) + 100.0


    class TinyPyramid(nn.Module):
      """`levels` stride-2 ConvBNReLU stages doubling from `width` channels, finest first."""
      width: int = 4
      levels: int = 3
      dtype: Any = jnp.float32

      @nn.compact
      def __call__(self, x, train: bool = False):
        pyramid = []
        for k in range(self.levels):
          x = layers.ConvBNReLU(self.width * 2 ** k, strides=2, dtype=self.dtype,
                                name=f'stage{k}')(x, train)
          pyramid.append(x)
        return pyramid


    @models.register_backbone('tiny_pyramid')
    def tiny_pyramid(model_config, dtype, levels: int = 3):
      return TinyPyramid(width=model_config.width, levels=levels, dtype=dtype)


    @losses.register_loss('fraction_offset', sees_outputs=True)
    def fraction_offset(logits, aux, batch):
      """1000 + the squared error of each image's predicted foreground fraction, over the
      final and side outputs (valid pixels)."""
      valid = batch['valid']
      truth = jnp.sum(batch['mask'] * valid, axis=(1, 2, 3)) / jnp.sum(valid, axis=(1, 2, 3))
      errors = []
      for out in [logits] + list(aux['side_outputs']):
        p = jax.nn.sigmoid(out[..., :1]) * valid
        errors.append(jnp.mean((jnp.sum(p, axis=(1, 2, 3)) / jnp.sum(valid, axis=(1, 2, 3))
                                - truth) ** 2))
      return 1000.0 + sum(errors) / len(errors)
'''


def run_main(*args, timeout=600):
  return helpers.run_cli(args, timeout=timeout)


def _error_lines(result) -> list[str]:
  return [l for l in result.stderr.splitlines() if l.startswith('error:')]


@pytest.fixture
def clean_registries():
  """Restores every registry (entries and order) after a test that registers."""
  saved = [(r, dict(r)) for r in (models.MODELS, fusion.FUSIONS, backbones.BACKBONES,
                                  losses.LOSSES)]
  yield
  for reg, entries in saved:
    for name in list(reg):
      reg.remove(name)
    for name, entry in entries.items():
      reg.add(name, entry)


@pytest.fixture(scope='module')
def user_run(tmp_path_factory):
  """(user file, run directory) of lowlevel trained from the CLI with the user's encoder,
  operator (features=6) and losses, imported from a file outside the repository."""
  root = tmp_path_factory.mktemp('user_code')
  user_file = root / 'elsewhere' / 'my_fusion.py'
  user_file.parent.mkdir()
  user_file.write_text(textwrap.dedent(USER_FILE))
  data = helpers.write_blob_dataset(root / 'data', num_train=8, num_test=2)
  workdir = root / 'run'
  result = run_main(
      '--config=configs/default.py', '--config.data.source=lists',
      f'--config.data.train_list={data}/train.txt', f'--config.data.test_list={data}/test.txt',
      '--config.data.crop_size=32', '--config.data.val_fraction=0.25',
      '--config.model.width=4', '--config.train.num_steps=2', '--config.train.batch_size=4',
      '--config.train.log_every_steps=1', '--config.eval.every_steps=2',
      '--config.eval.batch_size=2', '--config.model.name=lowlevel',
      '--config.model.variant=wrapped', '--config.model.backbone=tiny_pyramid',
      f'--config.imports={user_file}', '--config.model.fusion=mixed_concat',
      '--config.model.fusion_kwargs.features=6',
      '--config.train.loss=offset_bce+dice+fraction_offset', f'--workdir={workdir}')
  assert result.returncode == 0, result.stderr[-3000:]
  return user_file, workdir


def test_a_users_code_trains_lowlevel_from_the_cli(user_run, clean_registries):
  user_file, workdir = user_run
  saved = json.loads((workdir / 'config.json').read_text())
  assert saved['imports'] == str(user_file)
  assert saved['model']['backbone'] == 'tiny_pyramid'
  assert saved['model']['fusion'] == 'mixed_concat'
  assert saved['model']['fusion_kwargs'] == {'features': 6}
  assert saved['train']['loss'] == 'offset_bce+dice+fraction_offset'
  # The user's losses were the ones trained: bce + 100 + dice + 1000 + a squared fraction.
  rows = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  train_losses = [r['loss'] for r in rows if r['kind'] == 'train']
  assert train_losses and all(1100.0 < v < 1104.0 for v in train_losses)
  # The checkpoint holds the user's encoder (three stages) and the operator's parameters at
  # features=6: it restores into the model its config describes.
  assert registry.import_modules(str(user_file)) == ['my_fusion']
  config = rundir.read_config(workdir)
  mesh = sharding.make_mesh(jax.local_devices()[:1])
  state, _ = weights.load(config, workdir, mesh)
  assert sorted(state.params['backbone']) == ['stage0', 'stage1', 'stage2']
  fuse = {k: v['mix']['kernel'].shape for k, v in state.params.items() if k.startswith('fuse')}
  # [skip, decoder] at each level: 4 + 4 (full scale), then the decoder widths 8 and 16
  # twice (each encoder feature is projected to the decoder's width), mixed to features=6.
  assert fuse == {'fuse0': (1, 1, 8, 6), 'fuse1': (1, 1, 16, 6), 'fuse2': (1, 1, 32, 6)}
  sys.modules.pop('my_fusion')


def test_a_run_directory_never_imports_code_on_its_own(user_run):
  user_file, workdir = user_run
  for mode_flags in (['--mode=eval'], ['--mode=predict', f'--input={workdir}/eval',
                                        f'--output={workdir}/out']):
    refused = run_main(*mode_flags, f'--workdir={workdir}')
    assert refused.returncode == 2
    assert _error_lines(refused) == [
        f'error: {workdir}/config.json names code to import ({user_file}); a run directory '
        f'never runs code on its own: name it yourself with --config.imports={user_file} '
        '(or your copy of it), or pass --trust_imports'], refused.stderr[-2000:]
    assert 'Traceback' not in refused.stderr
  assert not (workdir / 'out').exists()
  # A hyper-parameter is part of the model: the command line cannot change it.
  changed = run_main('--mode=eval', f'--workdir={workdir}', '--trust_imports',
                     '--config.model.fusion_kwargs.features=5')
  assert changed.returncode == 2
  assert "--config.model.fusion_kwargs.features=5, but the model in" in changed.stderr
  trusted = run_main('--mode=eval', f'--workdir={workdir}', '--trust_imports')
  assert trusted.returncode == 0, trusted.stderr[-3000:]
  assert 'Test set (2 images' in trusted.stdout


def test_imports_to_run_takes_the_command_lines_or_trusted_code(tmp_path):
  config = default.get_config()
  config.imports = '/a/my_fusion.py, my_pkg.ops'
  assert rundir.imports_to_run(tmp_path, config, None, trust=True) == (
      '/a/my_fusion.py,my_pkg.ops')
  assert rundir.imports_to_run(tmp_path, config, '/b/copy.py', trust=False) == '/b/copy.py'
  with pytest.raises(UserError, match=r'names code to import \(/a/my_fusion.py, my_pkg.ops\)'):
    rundir.imports_to_run(tmp_path, config, None, trust=False)
  config.imports = ''
  assert rundir.imports_to_run(tmp_path, config, None, trust=False) == ''


def test_import_modules_loads_files_once_and_names_failures(tmp_path, clean_registries):
  user_file = tmp_path / 'my_ops.py'
  user_file.write_text(textwrap.dedent('''
      from flmiseg.models import fusion
      from flmiseg.models import layers

      @fusion.register_fusion('skip_only')
      def skip_only(dtype=None, name=None):
        return layers.Conv(2, (1, 1), dtype=dtype, name=name)
  '''))
  try:
    assert registry.import_modules(f' {user_file} ,json') == ['my_ops', 'json']
    assert registry.import_modules(str(user_file)) == ['my_ops']  # not run again
    assert fusion.get_fusion('skip_only') is sys.modules['my_ops'].skip_only
  finally:
    sys.modules.pop('my_ops', None)
  with pytest.raises(UserError, match=r'^config.imports: .*/nope.py: no such file$'):
    registry.import_modules(str(tmp_path / 'nope.py'))
  with pytest.raises(UserError, match=r"importing no_such_module_xyz failed \(ModuleNotFound"):
    registry.import_modules('no_such_module_xyz')
  relative = registry.normalize_imports(f'{os.path.relpath(user_file)}, json')
  assert relative == f'{user_file.resolve()},json'


def test_duplicate_names_are_refused_unless_overridden(clean_registries):
  with pytest.raises(ValueError, match="fusion operator 'concat' is already registered "
                     r'\(flmiseg.models.fusion.Concat\); pick another name, or pass '
                     'override=True'):
    fusion.register_fusion('concat')(fusion.Add)
  assert fusion.register_fusion('concat', override=True)(fusion.Add) is fusion.Add
  assert fusion.FUSIONS['concat'] is fusion.Add
  fusion.register_fusion('add')(fusion.Add)  # the same entry again: a module imported twice
  with pytest.raises(ValueError, match="loss 'bce' is already registered"):
    losses.register_loss('bce')(losses.dice)
  with pytest.raises(ValueError, match='cannot contain "\\+"'):
    losses.register_loss('bce+x')
  with pytest.raises(ValueError, match="model 'unet' is already registered"):
    models.register_model('unet')(lambda cfg, dtype: None)
  with pytest.raises(ValueError, match="backbone 'vgg16' is already registered"):
    models.register_backbone('vgg16')(lambda cfg, dtype: None)


def test_unknown_fusion_lists_every_registered_name(clean_registries):
  cfg = default.get_config().model
  cfg.name, cfg.variant, cfg.fusion = 'lowlevel', 'wrapped', 'nope'
  with pytest.raises(UserError, match=r"^config.model.fusion='nope' is not a fusion operator; "
                     f'valid names: {", ".join(BUILTIN_FUSIONS)}$'):
    models.create_model(cfg, jnp.float32)
  fusion.register_fusion('mine')(fusion.Concat)
  with pytest.raises(UserError, match=r'valid names: add, attention_gate, concat, mine, '):
    models.create_model(cfg, jnp.float32)


def test_fusion_kwargs_bind_the_operators_fields():
  cfg = default.get_config().model
  cfg.name, cfg.variant, cfg.width, cfg.backbone = 'lowlevel', 'wrapped', 4, 'vgg16'
  cfg.fusion = 'se_concat'
  cfg.fusion_kwargs.reduction, cfg.fusion_kwargs.min_channels = 2, 3
  model = models.create_model(cfg, jnp.float32)
  assert model.fusion.func is fusion.SEConcat
  assert model.fusion.keywords == {'reduction': 2, 'min_channels': 3}
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1))))
  # fuse0 joins 4 + 4 channels: bottleneck max(8 // 2, 3) = 4.
  assert params['params']['fuse0']['squeeze']['kernel'].shape == (8, 4)
  cfg.fusion_kwargs.reductoin = 8
  with pytest.raises(UserError, match=r"^config.model.fusion_kwargs.reductoin: not a field of "
                     r"the fusion operator 'se_concat' \(its fields: min_channels, reduction\)$"):
    models.create_model(cfg, jnp.float32)


def test_fusion_kwargs_apply_to_a_models_default_operator():
  cfg = default.get_config().model
  cfg.name, cfg.variant, cfg.width = 'segnet', 'lowlevel', 4
  cfg.fusion_kwargs.features = 3
  # segnet's default is concat, which has no fields: the kwarg cannot apply.
  with pytest.raises(UserError, match="fusion_kwargs.features: not a field of the fusion "
                     r"operator 'concat' \(its fields: none\)"):
    models.create_model(cfg, jnp.float32)


def test_cli_splits_free_fields_as_ml_collections_parses_literals():
  # pylint: disable-next=g-import-not-at-top  # defines absl flags
  from flmiseg.cli import flags as cli_flags
  argv = ['prog', '--config=c.py', '--config.model.fusion_kwargs.reduction=8',
          '--config.model.fusion_kwargs.gain=0.5', '--config.model.fusion_kwargs.kind=mean',
          '--config.model.fusion_kwargs.on', '--noconfig.model.fusion_kwargs.off',
          '--config.model.fusion_kwargs.flag=false', '--config.model.width=4']
  rest, fields = cli_flags.split_free_fields(argv)
  assert rest == ['prog', '--config=c.py', '--config.model.width=4']
  assert fields == [('model.fusion_kwargs', 'reduction', 8),
                    ('model.fusion_kwargs', 'gain', 0.5),
                    ('model.fusion_kwargs', 'kind', 'mean'),
                    ('model.fusion_kwargs', 'on', True),
                    ('model.fusion_kwargs', 'off', False),
                    ('model.fusion_kwargs', 'flag', False)]
  config = default.get_config().lock()
  cli_flags.set_free_fields(config, fields[:2])
  assert config.model.fusion_kwargs.to_dict() == {'reduction': 8, 'gain': 0.5}
  assert config.is_locked and config.model.fusion_kwargs.is_locked


def test_register_loss_is_used_by_config_train_loss(clean_registries):
  @losses.register_loss('half_bce')
  def half_bce(logits, targets, valid=None):
    return 0.5 * losses.bce(logits, targets, valid)

  logits = jnp.array([0.0, 2.0, -1.0, 3.0]).reshape(1, 2, 2, 1)
  targets = jnp.array([1.0, 0.0, 0.0, 1.0]).reshape(1, 2, 2, 1)
  config = default.get_config()
  config.train.loss, config.train.loss_weights = 'half_bce+dice', (2.0, 1.0)
  loss = losses.make_loss(config.train.loss, config.train.loss_weights)
  expected = losses.bce(logits, targets) + losses.dice(logits, targets)
  np.testing.assert_allclose(loss.pixels(logits, targets), expected, rtol=1e-6)
  np.testing.assert_allclose(loss(logits, {'side_outputs': []}, {'mask': targets}), expected,
                             rtol=1e-6)
  with pytest.raises(UserError, match="'halfbce' is not a loss; valid names: bce, wbce, focal, "
                     'soft_iou, dice, l1, mse, distance, half_bce'):
    losses.make_loss('halfbce')


def test_a_registered_backbone_trains_in_the_wrapper(clean_registries):
  class TwoLevels(nn.Module):
    width: int = 4

    @nn.compact
    def __call__(self, x, train: bool = False):
      a = nn.Conv(self.width, (3, 3), strides=2)(x)
      return [a, nn.Conv(2 * self.width, (3, 3), strides=2)(a)]

  @models.register_backbone('two_levels', stride=4)
  def two_levels(model_config, dtype):
    del dtype
    return TwoLevels(model_config.width)

  cfg = default.get_config().model
  cfg.name, cfg.variant, cfg.width, cfg.backbone = 'lowlevel', 'wrapped', 4, 'two_levels'
  model = models.create_model(cfg, jnp.float32)
  assert model.stride == 4 and isinstance(model.backbone, TwoLevels)
  (logits, aux), _ = jax.eval_shape(
      lambda: model.init_with_output(jax.random.key(0), jnp.zeros((1, 18, 22, 1))))
  assert logits.shape == (1, 18, 22, 1) and aux['bottleneck'].shape == (1, 5, 6, 8)


@pytest.mark.parametrize('name', sorted(models.MODELS))
def test_every_model_returns_the_aux_contract(name):
  for variant in models.MODELS[name].variants:
    cfg = default.get_config().model
    cfg.name, cfg.variant, cfg.width = name, variant, 4
    model = models.create_model(cfg, jnp.float32)
    (logits, aux), _ = jax.eval_shape(
        lambda: model.init_with_output(jax.random.key(0), jnp.zeros((2, 32, 32, 1))))
    assert {'skips', 'bottleneck', 'side_outputs'} <= set(aux), (name, variant)
    levels = list(aux['skips']) + [aux['bottleneck']]
    assert len(aux['skips']) >= 3 and all(f.ndim == 4 and f.shape[0] == 2 for f in levels)
    sizes = [f.shape[1] for f in levels]
    assert sizes == sorted(sizes, reverse=True), (name, variant, sizes)  # finest first
    assert all(o.shape == logits.shape and o.dtype == jnp.float32
               for o in aux['side_outputs'])


def test_a_users_encoder_serves_every_model_with_its_backbone_kwargs(tmp_path,
                                                                     clean_registries):
  user_file = tmp_path / 'my_encoders.py'
  user_file.write_text(textwrap.dedent(USER_FILE))
  try:
    registry.import_modules(str(user_file))
    cfg = default.get_config().model
    cfg.name, cfg.variant, cfg.width, cfg.backbone = 'lowlevel', 'wrapped', 4, 'tiny_pyramid'
    cfg.backbone_kwargs.levels = 2
    model = models.create_model(cfg, jnp.float32)
    assert model.stride == 4  # measured: the builder registered none
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1))))
    assert sorted(params['params']['backbone']) == ['stage0', 'stage1']
    # DeepLabv3+ resolves the same registry: five levels fit its original decoder ...
    cfg.name, cfg.variant, cfg.backbone_kwargs.levels = 'deeplabv3p', 'original', 5
    model = models.create_model(cfg, jnp.float32)
    assert model.stride == 32 and model.encoder.levels == 5
    (logits, aux), _ = jax.eval_shape(
        lambda: model.init_with_output(jax.random.key(0), jnp.zeros((1, 40, 40, 1))))
    assert logits.shape == (1, 40, 40, 1) and aux['bottleneck'].shape == (1, 2, 2, 64)
    # ... while its lowlevel variant needs an encoder whose stem it can set to stride 1.
    cfg.variant = 'lowlevel'
    with pytest.raises(UserError, match="^config.model.backbone='tiny_pyramid' is not a "
                       'backbone of deeplabv3p lowlevel'):
      models.create_model(cfg, jnp.float32)
  finally:
    sys.modules.pop('my_encoders', None)


def test_a_users_outputs_loss_sees_every_output_and_the_batch(tmp_path, clean_registries):
  user_file = tmp_path / 'my_losses.py'
  user_file.write_text(textwrap.dedent(USER_FILE))
  try:
    registry.import_modules(str(user_file))
    config = default.get_config()
    config.train.loss, config.model.instance_head = 'bce+fraction_offset', 'distance'
    config.train.instance_weight = 2.0
    loss = losses.from_config(config)
    assert loss.names == ('bce', 'fraction_offset', 'distance')
    # Logits 0 everywhere (p = 0.5), both channels; a side output; true foreground fractions
    # 0.25 and 0.75, so every output is 0.25 off on each image.
    logits = jnp.zeros((2, 2, 2, 2))
    mask = jnp.array([[1, 0, 0, 0], [1, 1, 1, 0]], jnp.float32).reshape(2, 2, 2, 1)
    batch = {'mask': mask, 'valid': jnp.ones((2, 2, 2, 1)),
             'distance': jnp.full((2, 2, 2, 1), 0.3)}
    value = loss(logits, {'side_outputs': [jnp.zeros((2, 2, 2, 2))]}, batch)
    # bce of p = 0.5 is ln 2 whatever the target: the pixel term, and the distance term twice.
    np.testing.assert_allclose(value, math.log(2) + 1000.0 + 0.25 ** 2 + 2.0 * math.log(2),
                               rtol=1e-6)
  finally:
    sys.modules.pop('my_losses', None)


def test_runs_made_before_backbone_kwargs_load_build_and_resume(tmp_path):
  old = json.loads(default.get_config().to_json())
  del old['model']['backbone_kwargs']
  old['model'].update(name='lowlevel', variant='wrapped', width=4, backbone='vgg16')
  (tmp_path / 'config.json').write_text(json.dumps(old))
  config = rundir.read_config(tmp_path)
  assert config.model.backbone_kwargs.to_dict() == {}
  assert models.create_model(config.model, jnp.float32).stride == 32
  assert trainer.prepare_workdir(config, tmp_path) == tmp_path  # not refused


def _docs_code(*sections: str) -> str:
  """The python blocks of the named '## ' sections of docs/fusion.md, joined."""
  text = (pathlib.Path(__file__).parent.parent / 'docs' / 'fusion.md').read_text()
  code = []
  for section in sections:
    body = text.split(f'\n## {section}\n', 1)[1].split('\n## ', 1)[0]
    code += [block.split('\n```', 1)[0] for block in body.split('```python\n')[1:]]
  assert len(code) >= len(sections)
  return '\n\n'.join(code)


def test_the_encoder_and_loss_of_docs_fusion_md_train(tmp_path, clean_registries):
  user_file = tmp_path / 'my_research.py'
  user_file.write_text(_docs_code('Your own encoder', 'Your own loss'))
  config = default.get_config()
  config.imports = str(user_file)
  config.model.name, config.model.variant, config.model.width = 'lowlevel', 'wrapped', 4
  config.model.backbone, config.model.backbone_kwargs.levels = 'strided_pyramid', 3
  config.model.instance_head = 'distance'
  config.train.loss, config.optim.warmup_steps = 'bce+dice+fraction', 0
  try:
    registry.import_modules(config.imports)
    config_checks.validate(config)
    loss = losses.from_config(config)
    assert loss.names == ('bce', 'dice', 'fraction', 'distance')
    # The fraction loss on a hand-made case: p = 0.5 everywhere, true fractions 1/4 and 3/4.
    mask = jnp.array([[1, 0, 0, 0], [1, 1, 1, 0]], jnp.float32).reshape(2, 2, 2, 1)
    batch = {'mask': mask, 'valid': jnp.ones_like(mask)}
    fraction = losses.LOSSES['fraction']
    np.testing.assert_allclose(fraction(jnp.zeros((2, 2, 2, 2)), {'side_outputs': []}, batch),
                               0.0625, rtol=1e-6)
    # A few training steps of the tiny model on one batch lower the loss.
    setup = trainer.build(config, (32, 32), 8)
    assert sorted(setup.state.params['backbone']) == ['stage0', 'stage1', 'stage2']
    train_step, _ = steps.jit_steps(config, loss, setup.schedule, setup.mesh,
                                    jax.tree.map(lambda x: x.sharding, setup.state))
    rng = np.random.default_rng(0)
    mask = (rng.random((8, 32, 32, 1)) > 0.7).astype(np.float32)
    host = {'image': (mask + rng.normal(0, 0.3, mask.shape)).astype(np.float32), 'mask': mask,
            'valid': np.ones_like(mask), 'distance': (mask * 0.5).astype(np.float32)}
    state, values = setup.state, []
    for _ in range(4):
      state, scalars = train_step(state, sharding.global_batch(host, setup.mesh))
      values.append(float(scalars['loss']))
    assert all(np.isfinite(values)) and values[-1] < values[0], values
  finally:
    sys.modules.pop('my_research', None)
