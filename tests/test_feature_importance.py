"""experiments/paper/feature_importance.py: ablation points, and a run on a tiny trained U-Net."""

import json

import jax
import numpy as np
import pytest

from experiments.paper import feature_importance
from flmiseg.core.errors import UserError
from flmiseg.models import lowlevel
from flmiseg.models import segnet
from flmiseg.models import unet
from flmiseg.models import vgg


def test_ablation_points_of_unet_and_lowlevel():
  assert feature_importance.ablation_points(unet.UNet(width=4), (32, 32)) == [
      'skip0', 'skip1', 'skip2', 'skip3', 'bottleneck']
  wrapped = lowlevel.lowlevel(vgg.VGG16Encoder(width=4), width=4, stride=32)
  points = feature_importance.ablation_points(wrapped, (64, 64))
  assert points[0] == 'skip0' and points[-1] == 'bottleneck' and len(points) == 6
  with pytest.raises(UserError, match='no `ablate` field'):
    feature_importance.ablation_points(segnet.SegNet(width=4), (32, 32))


@pytest.mark.parametrize('name', ['skip0', 'bottleneck'])
def test_lowlevel_ablation_changes_only_what_it_zeroes(name):
  model = lowlevel.lowlevel(vgg.VGG16Encoder(width=4), width=4, stride=32)
  x = jax.random.normal(jax.random.key(0), (1, 64, 64, 1))
  variables = model.init(jax.random.key(1), x)
  intact, _ = model.apply(variables, x)
  ablated, _ = model.clone(ablate=(name,)).apply(variables, x)
  unchanged, _ = model.clone(ablate=('no_such_input',)).apply(variables, x)
  np.testing.assert_array_equal(unchanged, intact)
  assert not np.allclose(ablated, intact)


def test_feature_importance_run(tiny_run):
  _, workdir = tiny_run
  rows = feature_importance.run(workdir)
  assert [r['zeroed'] for r in rows] == ['none', 'skip0', 'skip1', 'skip2', 'skip3',
                                         'bottleneck']
  intact = json.loads((workdir / 'eval' / 'summary.json').read_text())
  assert rows[0]['drop'] == 0.0
  np.testing.assert_allclose(rows[0]['iou'], intact['iou'], rtol=1e-6)
  assert any(r['drop'] != 0 for r in rows[1:])
  out = workdir / 'feature_importance'
  assert (out / 'importance.png').stat().st_size > 0
  assert '| skip0 |' in (out / 'table.md').read_text()


def test_feature_importance_never_imports_a_runs_code_on_its_own(tiny_run, tmp_path):
  _, workdir = tiny_run
  config = json.loads((workdir / 'config.json').read_text())
  planted = tmp_path / 'planted.py'
  planted.write_text('raise SystemExit("imported")\n')
  config['imports'] = str(planted)
  run = tmp_path / 'run'
  run.mkdir()
  (run / 'config.json').write_text(json.dumps(config))
  with pytest.raises(UserError, match='--trust_imports'):
    feature_importance.run(run)
  with pytest.raises(SystemExit, match='imported'):  # named by the user: it runs
    feature_importance.run(run, imports=str(planted))
