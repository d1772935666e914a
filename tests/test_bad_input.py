"""Bad input through the real command line (issue 7): one case per kind of input (list files,
images, settings, workdirs). Errors whose message the library raises in-process are checked
there too (tests/test_data.py, test_io_axes.py, test_config_checks.py: duplicate list entries,
empty lists, shape mismatches, every config field's range); here each kind reaches the CLI
once, as the one line and the exit status.

Every bad case must stop with exactly one `error:` line naming the file, list line or setting,
exit status 2 and no traceback. The subprocesses of all cases start together in one fixture
(the file stays fast) and each test checks its own. Odd but valid input (paths with spaces,
quotes, TABs, ../ and absolute paths into a read-only folder, a constant image, label masks)
shares one real training run that must succeed and write nothing outside its workdir.
Disk-space estimates and a checkpoint save that fails mid-run are tested here too.
"""

import concurrent.futures
import dataclasses
import json
import os
import pathlib
import resource
import shutil
import signal
import subprocess
import sys
from typing import Callable

import cv2
import numpy as np
import pytest
import tifffile

from flmiseg.store import checkpoint
from flmiseg.data import dataset
from flmiseg.data import io
from flmiseg.core.errors import UserError
from tests import helpers

REPO = pathlib.Path(__file__).resolve().parents[1]
G0 = 'good/train/images/train_000.tif good/train/masks/train_000.tif'
G1 = 'good/train/images/train_001.tif good/train/masks/train_001.tif'
# Without CAP_DAC_OVERRIDE root obeys file modes too, so chmod tests also work as root.
AS_USER = (['setpriv', '--bounding-set=-dac_override,-dac_read_search,-fowner']
           if os.geteuid() == 0 and shutil.which('setpriv') else [])


def cli(root, *args, workdir, prefix=(), preexec=None, fast=True):
  """Runs `python -m flmiseg.main` on a tiny config (2 devices); returns CompletedProcess."""
  flags = ['--config=configs/default.py', '--config.data.source=lists',
           f'--config.data.train_list={root}/good/train.txt', '--config.data.crop_size=32',
           '--config.model.width=4', '--config.train.num_steps=2',
           '--config.train.batch_size=2', '--config.eval.batch_size=2',
           '--config.eval.every_steps=2', '--config.data.val_fraction=0']
  args = [*flags, *args, f'--workdir={workdir}']
  # compile speed, not code speed, is what these tiny runs need (backend_level_0)
  if not prefix and preexec is None:
    return helpers.run_cli(args, backend_level_0=fast)
  # Another user, or limits on the process: a process of its own.
  return subprocess.run([*prefix, sys.executable, '-m', 'flmiseg.main', *args], cwd=REPO,
                        env=helpers.cli_env(2, backend_level_0=fast), capture_output=True,
                        text=True, timeout=300, preexec_fn=preexec)


def write_list(root, name, lines) -> str:
  path = pathlib.Path(root) / f'{name}.txt'
  path.write_text('\n'.join(lines) + '\n')
  return f'--config.data.train_list={path}'


def write_image(root, name, array) -> str:
  path = pathlib.Path(root) / 'bad' / name
  path.parent.mkdir(exist_ok=True)
  tifffile.imwrite(path, array, photometric='minisblack')
  return f'bad/{name}'


def with_image(root, name, array, mask='good/train/masks/train_000.tif'):
  return [write_list(root, name, [f'{write_image(root, name + ".tif", array)} {mask}', G1])]


def truncated_tiff(root):
  rng = np.random.default_rng(0)
  write_image(root, 'full.tif', rng.integers(0, 65535, (32, 32), dtype=np.uint16))
  data = (root / 'bad' / 'full.tif').read_bytes()
  (root / 'bad' / 'cut.tif').write_bytes(data[:len(data) // 2])
  return [write_list(root, 'truncated', [G1, 'bad/cut.tif good/train/masks/train_000.tif'])]


def corrupt_png(root):
  (root / 'bad').mkdir(exist_ok=True)
  (root / 'bad' / 'junk.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'not really a png' * 8)
  return [write_list(root, 'corrupt', ['bad/junk.png good/train/masks/train_000.tif'])]


def with_value(value):
  def setup(root):
    image = np.ones((32, 32), np.float32)
    image[3, 4] = value
    return with_image(root, f'value_{value}', image)
  return setup


def workdir_under_a_file(root):
  (root / 'work' / 'afile').write_text('not a folder')
  return []


def binary_list(root):
  (root / 'binary.txt').write_bytes(b'\x00\xff\xfe PK\x03\x04')
  return [f'--config.data.train_list={root}/binary.txt']


def other_config(root):
  workdir = root / 'work' / 'workdir_of_another_config'
  workdir.mkdir(parents=True)
  (workdir / 'config.json').write_text(json.dumps({'model': {'width': 64}}))
  return []


def unwritable(root):
  workdir = root / 'work' / 'unwritable_workdir'
  workdir.mkdir(parents=True)
  workdir.chmod(0o555)
  return []


@dataclasses.dataclass(frozen=True)
class Case:
  setup: Callable  # root -> extra flags (writes any files it needs)
  expect: tuple[str, ...]  # fragments of the one error line
  prefix: tuple[str, ...] = ()  # a command prefix (setpriv for the chmod case)


CASES = {
    # List files.
    'list_file_missing': Case(lambda r: [f'--config.data.train_list={r}/nope.txt'],
                              ('nope.txt: list file not found',)),
    'listed_file_missing': Case(
        lambda r: [write_list(r, 'gone', [G0, 'good/train/images/gone.tif x.tif'])],
        ('gone.txt line 2: image file not found:', 'gone.tif')),
    'unbalanced_quote': Case(lambda r: [write_list(r, 'quote', [f'"{G0}'])],
                             ('quote.txt line 1: cannot parse line',)),
    'binary_list_file': Case(binary_list, ('binary.txt: not a text list file',)),
    # Images.
    'truncated_tiff': Case(truncated_tiff, ('truncated.txt line 2:', 'cut.tif: cannot read')),
    'corrupt_png': Case(corrupt_png, ('corrupt.txt line 1:', 'junk.png: cannot read image')),
    'nan_values': Case(with_value(np.nan), ('value_nan.tif: image contains NaN or inf',)),
    'inf_values': Case(with_value(np.inf), ('value_inf.tif: image contains NaN or inf',)),
    # Settings.
    'unknown_model': Case(lambda r: ['--config.model.name=unett'], (
        "config.model.name='unett' is not a model; valid names: agnet, deeplabv3p, fcn",)),
    'mistyped_setting': Case(lambda r: ['--config.train.batchsize=2'], (
        "--config.train.batchsize: no such setting 'batchsize' (did you mean \"batch_size\"",)),
    'missing_config_file': Case(lambda r: ['--config=configs/nope.py'], (
        '--config=configs/nope.py: cannot load it', 'No such file')),
    'batch_not_divisible_by_devices': Case(lambda r: ['--config.train.batch_size=3'], (
        'config.train.batch_size=3 is not divisible by the 2 devices; set it to a multiple '
        'of 2, e.g. config.train.batch_size=2',)),
    # Workdirs.
    'workdir_under_a_file': Case(workdir_under_a_file, (
        'afile/workdir_under_a_file: cannot create it',)),
    'workdir_of_another_config': Case(other_config, (
        'was made by a different config', '--config.train.resume_mismatch=allow')),
    'unwritable_workdir': Case(
        unwritable, ('unwritable_workdir: not writable (Permission denied)',),
        prefix=tuple(AS_USER)),
}


def _workdir(root, name):
  if name == 'workdir_under_a_file':
    return root / 'work' / 'afile' / name
  return root / 'work' / name


@pytest.fixture(scope='module')
def root(tmp_path_factory):
  root = tmp_path_factory.mktemp('bad_input')
  helpers.write_blob_dataset(root / 'good', num_train=4, num_test=2)
  (root / 'work').mkdir()
  return root


@pytest.fixture(scope='module')
def results(root):
  """Runs every case's CLI (4 at a time); name -> CompletedProcess."""
  def run(name):
    case = CASES[name]
    return cli(root, *case.setup(root), workdir=_workdir(root, name), prefix=case.prefix)
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    return dict(zip(CASES, pool.map(run, CASES)))


def _one_error_line(result) -> str:
  output = result.stdout + result.stderr
  assert 'Traceback' not in output, output[-3000:]
  lines = [l for l in output.splitlines() if l.startswith('error:')]
  assert len(lines) == 1, output[-3000:]
  return lines[0]


@pytest.mark.parametrize('name', CASES)
def test_bad_input_gives_one_error_line_and_status_2(results, root, name):
  if name == 'unwritable_workdir' and os.geteuid() == 0 and not AS_USER:
    pytest.skip('running as root without setpriv: file modes do not apply')
  result = results[name]
  line = _one_error_line(result)
  assert result.returncode == 2, (result.returncode, line)
  for fragment in CASES[name].expect:
    assert fragment in line, line
  assert not (_workdir(root, name) / 'checkpoints').exists()  # stopped before training


def test_debug_shows_the_traceback(root):
  result = cli(root, f'--config.data.train_list={root}/nope.txt', '--debug',
               workdir=root / 'work' / 'debug')
  assert result.returncode != 0
  assert 'Traceback' in result.stderr and 'UserError: ' in result.stderr


# Odd but valid input: one real training run.

def _snapshot(folder: pathlib.Path, skip: pathlib.Path) -> dict:
  """path -> (size, mtime) of everything under folder except skip."""
  return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob('*')
          if skip not in p.parents and p != skip}


@pytest.fixture(scope='module')
def odd_run(tmp_path_factory):
  """Trains (2 steps) and tests on lists with spaces, quotes, a TAB, ../ and absolute paths
  into a read-only folder, a constant image and label masks."""
  root = tmp_path_factory.mktemp('odd')
  helpers.write_blob_dataset(root / 'good', num_train=4, num_test=2)
  spaced = root / 'my data'
  (spaced / 'masks').mkdir(parents=True)
  tifffile.imwrite(spaced / 'flat image.tif', np.full((32, 32), 1234, np.uint16))
  labels = np.zeros((32, 32), np.uint16)
  labels[4:12, 4:12], labels[20:30, 18:28], labels[0, 31] = 3, 700, 65535
  tifffile.imwrite(spaced / 'masks' / 'labels.tif', labels)
  cv2.imwrite(str(spaced / 'masks' / 'flat 0-255.png'), ((labels > 0) * 255).astype(np.uint8))
  readonly = root / 'readonly'
  shutil.copytree(root / 'good' / 'train', readonly)
  for path in [readonly, *readonly.rglob('*')]:
    path.chmod(0o555 if path.is_dir() else 0o444)
  lists = root / 'lists'
  lists.mkdir()
  (lists / 'train.txt').write_text(
      '"../my data/flat image.tif" "../my data/masks/labels.tif"\n'
      '../good/train/images/train_000.tif\t../my data/masks/labels.tif\n'
      f'{readonly}/images/train_001.tif {readonly}/masks/train_001.tif\n'
      f"'{root}/good/train/images/train_002.tif' ../good/train/masks/train_002.tif\n")
  (lists / 'test.txt').write_text(
      '"../my data/flat image.tif"\t"../my data/masks/flat 0-255.png"\n'
      f'{readonly}/images/train_003.tif {readonly}/masks/train_003.tif\n')
  workdir = root / 'work'
  before = _snapshot(root, workdir)
  # A crop larger than every image: trained on crops of the largest side (32), with a warning.
  result = cli(root, f'--config.data.train_list={lists}/train.txt',
               f'--config.data.test_list={lists}/test.txt', '--config.data.crop_size=48',
               workdir=workdir)
  return {'root': root, 'workdir': workdir, 'result': result, 'labels': labels,
          'before': before, 'after': _snapshot(root, workdir)}


def test_paths_with_spaces_quotes_tabs_relative_and_absolute(odd_run):
  result = odd_run['result']
  assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
  assert 'Test set (2 images' in result.stdout
  assert len(list((odd_run['workdir'] / 'cache').glob('*_image.npy'))) == 4 + 2
  assert ('warning: config.data.crop_size=48 is larger than every training image (largest '
          'side 32): training on crops of 32\n') in result.stderr
  # DIR/config.json records what it trained.
  saved = json.loads((odd_run['workdir'] / 'config.json').read_text())
  assert saved['data']['crop_size'] == 32


def test_constant_image_trains_and_predicts(odd_run):
  assert odd_run['result'].returncode == 0
  images = [np.load(p) for p in (odd_run['workdir'] / 'cache').glob('*_image.npy')]
  assert all(np.all(np.isfinite(x)) for x in images)
  # The constant image (listed in both sets) normalises to zeros, not to a division by zero.
  assert sum(not np.any(x) for x in images) == 2
  rows = (odd_run['workdir'] / 'eval' / 'per_image.csv').read_text().splitlines()
  name, tp, fp, fn, tn = rows[1].split(',')[:5]
  assert name == 'flat image' and int(tp) + int(fp) + int(fn) + int(tn) == 32 * 32


def test_label_masks_any_nonzero_pixel_is_foreground(odd_run):
  assert odd_run['result'].returncode == 0
  masks = [np.load(p) for p in (odd_run['workdir'] / 'cache').glob('*_mask.npy')]
  expected = (odd_run['labels'] != 0).astype(np.uint8)
  assert expected.sum() == 64 + 100 + 1
  assert sum(np.array_equal(m, expected) for m in masks) == 3  # labels.tif x2, the PNG
  assert all(set(np.unique(m)) <= {0, 1} for m in masks)


def test_list_paths_cannot_make_the_tool_write_outside_the_workdir(odd_run):
  assert odd_run['result'].returncode == 0
  assert odd_run['after'] == odd_run['before']
  cache = odd_run['workdir'] / 'cache'
  assert all(p.parent == cache for p in cache.rglob('*'))  # named by hash, never by path


def test_checkpoints_and_config_hold_no_pickle(odd_run):
  """Restoring reads JSON and tensorstore arrays only: no file is a pickle."""
  assert odd_run['result'].returncode == 0
  workdir = odd_run['workdir']
  files = [p for p in (workdir / 'checkpoints').rglob('*') if p.is_file()]
  assert files
  for path in files:
    head = path.read_bytes()[:2]
    assert not (head[:1] == b'\x80' and head[1:2] in (b'\x02', b'\x03', b'\x04', b'\x05')), path
  json.loads((workdir / 'config.json').read_text())
  for path in (workdir / 'cache').glob('*.npy'):
    np.load(path, allow_pickle=False)


def test_failed_checkpoint_save_keeps_the_last_good_one(odd_run, tmp_path):
  """A save that fails mid-run (the file-size limit makes the write fail, as a full disk
  would) stops with one line; the previous checkpoint stays complete and restorable."""
  assert odd_run['result'].returncode == 0
  workdir = tmp_path / 'work'
  shutil.copytree(odd_run['workdir'], workdir)
  root = odd_run['root']

  def limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

  result = cli(root, f'--config.data.train_list={root}/lists/train.txt',
               f'--config.data.test_list={root}/lists/test.txt', '--config.train.num_steps=4',
               '--config.train.checkpoint_every_steps=1',
               '--config.train.resume_mismatch=allow', workdir=workdir,
               preexec=limit_file_size)
  # Only this path (a write failing half-way, not a full disk, which is refused before
  # writing) may show tensorstore's own "Event loop is closed" tracebacks before our line.
  lines = [l for l in (result.stdout + result.stderr).splitlines() if l.startswith('error:')]
  assert len(lines) == 1, result.stderr[-3000:]
  line = lines[0]
  assert result.returncode == 2
  assert 'cannot write the checkpoint of step 3 (File too large)' in line, line
  assert 'the last complete checkpoint (step 2) is kept' in line, line
  # The failed step is left as an unfinished `3.orbax-checkpoint-tmp` folder, which orbax
  # ignores and the rerun removes before its first save (test_fault_injection.py), and which
  # the disk check counts as free space.
  names = sorted(p.name for p in (workdir / 'checkpoints').iterdir())
  assert [n for n in names if not n.endswith('.orbax-checkpoint-tmp')] == ['2'], names
  assert not (workdir / 'checkpoints_best').exists()
  ckpt = checkpoint.Checkpointer(workdir)
  assert ckpt.latest_step() == 2 and ckpt.best_step() == 2
  ckpt.close()


# Disk space: the estimate and the check before training.

def test_disk_estimate_counts_kept_best_and_in_flight_checkpoints():
  one = 1000 + 10 * checkpoint.BYTES_PER_LEAF + checkpoint.BYTES_PER_CHECKPOINT
  assert checkpoint.estimate_disk_bytes(1000, 10, 2) == 4 * one + checkpoint.LOG_BYTES
  assert checkpoint.estimate_disk_bytes(1000, 10, 2, existing=3) == one + checkpoint.LOG_BYTES
  assert checkpoint.estimate_disk_bytes(1000, 10, 2, existing=9) == checkpoint.LOG_BYTES
  state = {'w': np.zeros((3, 5), np.float32), 'step': np.zeros((), np.int32)}
  assert checkpoint.tree_bytes(state) == (3 * 5 * 4 + 4, 2)
  assert dataset.cache_bytes(32 * 32) == 32 * 32 * 5 + 256


def test_pixel_count_reads_headers(tmp_path):
  tifffile.imwrite(tmp_path / 'a.tif', np.zeros((48, 40), np.uint16))
  cv2.imwrite(str(tmp_path / 'b.png'), np.zeros((30, 20), np.uint8))
  (tmp_path / 'c.tif').write_bytes(b'II*\x00garbage')
  assert io.pixel_count(tmp_path / 'a.tif') == 48 * 40
  assert io.pixel_count(tmp_path / 'b.png') == 30 * 20
  assert io.pixel_count(tmp_path / 'c.tif') == 11  # unreadable: its size, an upper bound


def test_not_enough_space_is_refused_before_training(tmp_path, monkeypatch):
  usage = shutil.disk_usage(tmp_path)
  monkeypatch.setattr(shutil, 'disk_usage', lambda _: usage._replace(free=5 * 2**20))
  state = {'w': np.zeros((2**20,), np.float32)}  # 4 MiB: 4 checkpoints do not fit in 5 MiB
  with pytest.raises(UserError, match=r'run: not enough disk space for the checkpoints and '
                     r'logs of this run: about 2\d\.\d MiB needed, 5\.0 MiB free'):
    checkpoint.check_disk_space(tmp_path / 'run', state, max_to_keep=2)
  (tmp_path / 'big').mkdir()
  with pytest.raises(UserError, match='preprocessing cache of 1 images'):
    io.check_free_space(tmp_path / 'big', dataset.cache_bytes(2000 * 2000),
                        'the preprocessing cache of 1 images')
  # A resumed run: its checkpoint takes its share, and the unfinished folder of a save cut
  # short (removed when the checkpoints open) counts as free: 3 x 4 + 8 - 16 MiB needed.
  (tmp_path / 'run' / 'checkpoints' / '3').mkdir(parents=True)
  unfinished = tmp_path / 'run' / 'checkpoints' / '4.orbax-checkpoint-tmp' / 'state'
  unfinished.mkdir(parents=True)
  with open(unfinished / 'd', 'wb') as f:
    f.truncate(16 * 2**20)  # sparse: its size, not its blocks, is what is counted
  one = checkpoint.checkpoint_bytes(*checkpoint.tree_bytes(state))
  assert checkpoint.check_disk_space(tmp_path / 'run', state, max_to_keep=2) == (
      3 * one + checkpoint.LOG_BYTES)
  small = {'w': np.zeros((10,), np.float32)}
  monkeypatch.setattr(shutil, 'disk_usage', lambda _: usage._replace(free=10 * 2**20))
  assert checkpoint.check_disk_space(tmp_path / 'run', small, max_to_keep=2) < 10 * 2**20


def test_full_disk_at_a_save_is_refused_before_writing(tmp_path, monkeypatch):
  ckpt = checkpoint.Checkpointer(tmp_path)
  state = {'w': np.arange(1000, dtype=np.float32)}
  ckpt.save(1, state, {'position': 1}, {'step': 1}, None)
  usage = shutil.disk_usage(tmp_path)
  monkeypatch.setattr(shutil, 'disk_usage', lambda _: usage._replace(free=4000))
  with pytest.raises(UserError, match=r'checkpoints: cannot write the checkpoint of step 2 \(No '
                     r'space left on device\); the last complete checkpoint \(step 1\) is kept'):
    ckpt.save(2, state, {'position': 2}, {'step': 2}, None)
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['1']
  restored = ckpt.restore_last(checkpoint.abstract(state))
  ckpt.close()
  assert restored[2] == {'step': 1} and np.array_equal(restored[0]['w'], state['w'])


def test_a_tampered_checkpoint_is_only_read_as_data(tmp_path):
  """Restore picks its handlers from our arguments, not from the names a checkpoint records,
  and JSON records stay strings: nothing in a checkpoint folder is executed."""
  ckpt = checkpoint.Checkpointer(tmp_path)
  state = {'w': np.arange(4, dtype=np.float32)}
  ckpt.save(1, state, {'position': 1}, {'step': 1}, checkpoint.best_metrics(1, 0.5))
  ckpt.close()
  folder = tmp_path / 'checkpoints' / '1'
  meta = json.loads((folder / '_CHECKPOINT_METADATA').read_text())
  meta['item_handlers'] = {k: 'os.system' for k in meta['item_handlers']}
  (folder / '_CHECKPOINT_METADATA').write_text(json.dumps(meta))
  payload = f"__import__('os').system('touch {tmp_path}/executed')"
  (folder / 'record' / 'metadata').write_text(json.dumps({'step': 1, 'x': payload}))
  ckpt = checkpoint.Checkpointer(tmp_path)
  restored, data_state, record = ckpt.restore_last(checkpoint.abstract(state))
  ckpt.close()
  assert np.array_equal(restored['w'], state['w']) and data_state == {'position': 1}
  assert record == {'step': 1, 'x': payload} and not (tmp_path / 'executed').exists()


# Predict: the output folder equal to the input folder, and a file that is not an image.

def _predict_cli(tiny_run, *args):
  _, workdir = tiny_run  # the run directory holds the config
  return helpers.run_cli([f'--workdir={workdir}', '--mode=predict', *args],
                         backend_level_0=True)


def test_predict_cli_output_folder_equal_to_input_and_non_image_files(tiny_run, tmp_path):
  src = tmp_path / 'in'
  src.mkdir()
  image = np.random.default_rng(4).integers(0, 900, (40, 52), np.uint16)
  tifffile.imwrite(src / 'cell.tif', image)
  (src / 'notes.txt').write_text('not an image')
  before = _snapshot(src, tmp_path / 'nothing')

  same = _predict_cli(tiny_run, f'--input={src}', f'--output={src}')
  line = _one_error_line(same)
  assert same.returncode == 2, line
  assert f'--output={src} is the folder of the input images' in line
  assert _snapshot(src, tmp_path / 'nothing') == before  # nothing written into the input

  ok = _predict_cli(tiny_run, f'--input={src}', f'--output={tmp_path / "out"}')
  assert ok.returncode == 0, ok.stderr[-3000:]
  assert 'Traceback' not in ok.stderr
  assert 'Skipping' in ok.stderr and 'notes.txt (not an image: .txt)' in ok.stderr
  assert 'Predicted 1 image(s)' in ok.stdout
  assert 'skipped 1 non-image file(s)' in ok.stdout
  assert tifffile.imread(tmp_path / 'out' / 'cell_mask.tif').shape == image.shape
  assert not (tmp_path / 'out' / 'notes_mask.tif').exists()

  again = _predict_cli(tiny_run, f'--input={src}', f'--output={tmp_path / "out"}')
  line = _one_error_line(again)
  assert again.returncode == 2 and 'cell_mask.tif exists' in line and '--overwrite' in line
