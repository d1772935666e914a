"""DIR/eval/ files: written by process 0 only, each whole (a temporary file renamed over it);
the host-side metrics are computed once, on process 0, and shared with the others."""

import errno
import json
import os

from matplotlib import figure
import pytest

from flmiseg.evaluation import evaluate
from flmiseg.core import files
from flmiseg.core import sharding
from flmiseg.train import steps
from flmiseg.train import trainer
from flmiseg.data import loader
from flmiseg.core.errors import UserError
from tests import helpers

FILES = ['per_image.csv', 'report.md', 'summary.json', 'worst_best.png']


@pytest.fixture(scope='module')
def model(tmp_path_factory):
  """(predict, state, test source, mesh) of an untrained width-4 U-Net on 3 blob images."""
  root = tmp_path_factory.mktemp('eval_files')
  config = helpers.tiny_config(helpers.write_blob_dataset(root / 'data', num_train=4,
                                                          num_test=3))
  data = loader.load(config, root / 'cache')
  setup = trainer.build(config, (32, 32), len(data.train))
  return steps.jit_predict(0.5), setup.state, data.test, setup.mesh


def _evaluate(model, out_dir):
  predict, state, source, mesh = model
  return evaluate.evaluate(predict, state, source, mesh, 2, 0.5, out_dir=out_dir)


def test_process_zero_writes_every_file_whole(model, tmp_path):
  summary = _evaluate(model, tmp_path / 'eval')
  assert sorted(os.listdir(tmp_path / 'eval')) == FILES  # no temporary file left
  assert json.loads((tmp_path / 'eval/summary.json').read_text())['num_images'] == 3
  assert summary['num_images'] == 3


def test_other_processes_write_nothing_and_return_process_zeros_summary(
    model, tmp_path, monkeypatch):
  shared = {'num_images': 3, 'iou': 0.25}  # what process 0 broadcasts
  monkeypatch.setattr(files, 'is_primary', lambda: False)
  monkeypatch.setattr(sharding, 'from_primary', lambda value: shared if value is None else None)
  assert _evaluate(model, tmp_path / 'eval') is shared
  assert not (tmp_path / 'eval').exists()


def test_a_failed_write_keeps_the_old_file(model, tmp_path, monkeypatch):
  out = tmp_path / 'eval'
  out.mkdir()
  (out / 'worst_best.png').write_bytes(b'the previous figure')

  def full_disk(self, path, **kwargs):
    del self, kwargs
    path.write_bytes(b'\x89PNG half')
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  monkeypatch.setattr(figure.Figure, 'savefig', full_disk)
  with pytest.raises(UserError, match=r'worst_best.png: cannot write it \(No space left'):
    _evaluate(model, out)
  assert (out / 'worst_best.png').read_bytes() == b'the previous figure'
  assert sorted(os.listdir(out)) == FILES  # no temporary file left


def test_one_process_shares_the_value_itself():
  value = {'a': [1, 2.5, None]}
  assert sharding.from_primary(value) is value
