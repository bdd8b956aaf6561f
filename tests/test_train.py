"""The train loop: frozen encoders, hand-off, bad input, exact resume, preemption, damage."""

import json
import os
import shutil
import signal
import subprocess
import sys
import types

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import common
from ddep.config import validation as config_validation
from ddep.models import create_model
from ddep.models import initialization
from ddep.models import pretrained
from ddep.runs import checkpointing
from ddep.runs import lock as lock_lib
from ddep.training import trainer as train
import tiny_runs
import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _flat(tree):
  return {
      '/'.join(k): np.asarray(v)
      for k, v in flax.traverse_util.flatten_dict(flax.core.unfreeze(tree)).items()
  }


Batches = tiny_runs.Batches
_config = tiny_runs.config


@pytest.fixture(scope='module')
def encoder_npz(tmp_path_factory):
  """A 'supervised' encoder in the published npz layout."""
  model = create_model('tiny', num_outputs=3)
  params = tiny_runs.init_params(model, (1, 32, 32, 3), seed=7)
  enc = jax.tree.map(lambda x: 0.05 * x, tiny_runs.normal_like(params['encoder'], 8))
  path = str(tmp_path_factory.mktemp('enc') / 'encoder.npz')
  np.savez(path, **pretrained.encoder_to_vit_layout(enc))
  return path, _flat(enc)


@pytest.fixture(scope='module')
def ddep_run(encoder_npz, tmp_path_factory):
  path, _ = encoder_npz
  workdir = str(tmp_path_factory.mktemp('ddep'))
  config = _config(init_encoder_from=path, frozen=('encoder/.*',), method='ddep')
  config.denoise.sigma = 0.1
  return workdir, train.train_and_evaluate(config, workdir, train_iter=Batches())


def test_ddep_trains_decoder_only_with_no_encoder_optimizer_state(encoder_npz, ddep_run):
  _, enc = encoder_npz
  workdir, result = ddep_run
  got = _flat(result.params['encoder'])
  for k, v in enc.items():
    np.testing.assert_array_equal(got[k], v, err_msg=k)  # Frozen: bit-identical.
  fresh = _flat(
      tiny_runs.init_params(create_model('tiny', num_outputs=3), (1, 32, 32, 3))['decoder']
  )
  moved = [k for k, v in _flat(result.params['decoder']).items() if not np.allclose(v, fresh[k])]
  assert moved, 'decoder did not train'
  state = ocp.StandardCheckpointer().restore(os.path.join(workdir, 'checkpoints', '2', 'state'))
  opt_paths = [
      '/'.join(str(getattr(p, 'key', p)) for p in path)
      for path, _ in jax.tree_util.tree_flatten_with_path(state['opt'])[0]
  ]
  assert opt_paths and not any('encoder' in p for p in opt_paths)
  assert any('decoder' in p for p in opt_paths)
  assert set(state['frozen']) == {'encoder'} and 'encoder' not in state['params']


def test_param_norm_is_logged_at_each_log_step_as_the_trained_parameters_norm(ddep_run):
  """The train step leaves it out (docs/performance.md); the loop logs it from the state."""
  workdir, result = ddep_run
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    logged = [row for row in map(json.loads, f) if 'train/loss' in row]
  assert logged and all({'train/grad_norm', 'train/param_norm'} <= set(row) for row in logged)
  assert logged[-1]['step'] == result.step
  trained = [x for k, v in result.params.items() if k != 'encoder' for x in jax.tree.leaves(v)]
  want = np.sqrt(sum(np.sum(np.square(x.astype(np.float64))) for x in trained))
  np.testing.assert_allclose(logged[-1]['train/param_norm'], want, rtol=1e-5)


def test_fsdp_shards_params_and_matches_data_parallel(tmp_path):
  assert jax.device_count() == 2
  config = _config()
  dp = train.train_and_evaluate(config, str(tmp_path / 'dp'), train_iter=Batches())
  config.mesh.fsdp = True
  fsdp = train.train_and_evaluate(config, str(tmp_path / 'fsdp'), train_iter=Batches())
  a, b = _flat(dp.params), _flat(fsdp.params)
  for k in a:
    if k.endswith('key/bias'):
      continue  # Softmax ignores it: its gradient is pure rounding noise, which Adam scales up.
    # Sharded reductions sum in another order, and Adam's normalisation magnifies the
    # rounding of near-zero gradients: a few elements may move by a few % of one update
    # (lr 1e-3); a wrong sharding would move all of them by a whole update.
    np.testing.assert_allclose(a[k], b[k], rtol=0, atol=5e-5, err_msg=k)
    assert np.mean(np.abs(a[k] - b[k])) < 1e-6, k
  # The large kernels really were split across the two devices.
  from ddep.training import sharding

  spec = sharding.fsdp_spec(a['decoder/block0/conv1/kernel'].shape, 2)
  assert 'data' in tuple(spec)


def test_handoff_takes_encoder_and_decoder_and_reinitialises_head(ddep_run):
  workdir, result = ddep_run
  config = _config(task='segment', init_from=workdir)
  model = create_model('tiny', num_outputs=6)
  # Fine-tuning crops (48) differ from pretraining crops (32): the 2x2 position grid
  # is resized to 3x3 like a published encoder's would be.
  fresh = tiny_runs.init_params(model, (1, 48, 48, 3), seed=3)
  params = _flat(initialization.initial_params(config, fresh))
  src = _flat(result.params)
  for k, v in params.items():
    if k.startswith('head/'):
      np.testing.assert_array_equal(v, _flat(fresh)[k])
      assert v.shape[-1] == 6
    elif k.endswith('pos_embedding'):
      assert v.shape == (1, 3, 3, 64) and src[k].shape == (1, 2, 2, 64)
      np.testing.assert_allclose(
          v, jax.image.resize(src[k], v.shape, 'bilinear', antialias=False), atol=1e-6
      )
    else:
      np.testing.assert_array_equal(v, src[k], err_msg=k)


def test_handoff_errors_are_clear(ddep_run, tmp_path):
  workdir, _ = ddep_run
  with pytest.raises(FileNotFoundError, match='does not exist'):
    checkpointing.load_params(str(tmp_path / 'missing'))
  with pytest.raises(FileNotFoundError, match='no finished checkpoint'):
    checkpointing.load_params(str(tmp_path))
  wide = create_model('tiny', num_outputs=6, decoder_width_multiplier=2)
  fresh = tiny_runs.init_params(wide, (1, 32, 32, 3), seed=3)
  with pytest.raises(ValueError, match=r'differ in shape: .*decoder/block0/conv1/kernel'):
    initialization.initial_params(_config(task='segment', init_from=workdir), fresh)


def test_nan_between_a_log_step_and_an_eval_step_is_never_evaluated_nor_kept(tmp_path):
  workdir = str(tmp_path / 'run')
  config = _config(total_steps=8, log_every=10, checkpoint_every=10, eval_every=4)
  config.eval.denoise_images = 2
  config.data.prepare, config.data.data_dir = True, str(tmp_path / 'data')
  with pytest.raises(train.NonFiniteLossError, match='at step 3;'):
    train.train_and_evaluate(config, workdir, train_iter=Batches(nan_at_step=3))
  best = os.path.join(workdir, 'best')
  assert not os.path.exists(best) or not os.listdir(best)
  assert not os.path.exists(os.path.join(workdir, 'checkpoints', '4'))
  if os.path.exists(os.path.join(workdir, 'metrics.jsonl')):
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      assert not [line for line in f if 'val/' in line]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  workdir = str(tmp_path)
  config = _config(total_steps=5)
  with pytest.raises(train.NonFiniteLossError, match='at step 3;.*step 2'):
    train.train_and_evaluate(config, workdir, train_iter=Batches(nan_at_step=3))
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')) if s.isdigit())
  assert steps[-1] == 2
  params = checkpointing.load_params(workdir)
  assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(params))


@pytest.mark.parametrize(
    'key,value,match',
    [
        ('data.image_size', (40, 32), r'config\.data\.image_size: 40x32 is not divisible by 16'),
        ('denoise.sigma', 0.0, r'config\.denoise\.sigma: must be > 0'),
        ('method', 'mae', r"config\.method: unknown method 'mae'"),
        ('data.label_fraction', 1.5, r'config\.data\.label_fraction: 1\.5 is outside \(0, 1\]'),
        ('denoise.sigma_range', (0.3, 0.2), r'config\.denoise\.sigma_range'),
        ('data.area_range', (0.5, 1.2), r'config\.data\.area_range: expected \(lo, hi\)'),
        (
            'data.batch_size',
            3,
            r'config\.data\.batch_size: 3 must be .* divisible by the 2 devices',
        ),
        ('eval.protocol', 'sliding', r"config\.eval\.protocol: unknown protocol 'sliding'"),
        ('optim.decay', 'exponential', r"config\.optim\.decay: unknown decay 'exponential'"),
        ('model.remat', ('encoder',), r"config\.model\.remat: unknown parts \['encoder'\]"),
        ('mesh.state_layouts', 'tiled', r"config\.mesh\.state_layouts: 'tiled'; choose from"),
        ('data.dataset', 'cityscape', r"config\.data\.dataset: unknown dataset 'cityscape'"),
    ],
)
def test_invalid_configs_fail_before_compiling(key, value, match):
  with pytest.raises(config_validation.ConfigError, match=match):
    config_validation.validate(_config(**{key: value}), num_devices=2)


def _main(workdir, data_dir, extra=(), **popen_kw):
  cmd = [
      sys.executable,
      '-m',
      'ddep.main',
      '--config=tests/configs/tiny_denoise.py',
      f'--workdir={workdir}',
      f'--config.data.data_dir={data_dir}',
      *extra,
  ]
  env = dict(
      os.environ,
      PYTHONPATH=REPO,
      # The devices of this process, so that its runs equal those run here.
      XLA_FLAGS=xla_flags.with_devices(2),
      JAX_DISABLE_MOST_OPTIMIZATIONS='true',
  )
  return subprocess.Popen(
      cmd,
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      **popen_kw,
  )


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
  data_dir = str(tmp_path / 'data')
  straight, killed = str(tmp_path / 'straight'), str(tmp_path / 'killed')
  # The uninterrupted reference, here: what matters is its result, not its launcher.
  train.train_and_evaluate(tiny_runs.cli_config('tiny_denoise', data_dir), straight)

  # Kill -9 after step 3, between the checkpoints at steps 2 and 4.
  p = _main(killed, data_dir)
  seen = []
  for line in p.stdout:
    seen.append(line)
    if 'step 3/6' in line:
      p.send_signal(signal.SIGKILL)
      break
  p.wait(timeout=60)
  assert p.returncode == -signal.SIGKILL, ''.join(seen)[-3000:]
  assert checkpointing.Checkpointer(killed, keep=2).latest_step() == 2
  curves = os.path.join(killed, 'metrics.jsonl')
  with open(curves) as f:
    assert [json.loads(line)['step'] for line in f] == [1, 2, 3]
  with open(curves, 'a') as f:
    f.write('{"step": 4, "train/lo')  # As if killed in the middle of writing a row.

  p = _main(killed, data_dir)
  out = p.communicate(timeout=300)[0]
  assert p.returncode == 0, out[-3000:]
  assert 'resumed' in out and 'at step 2/6' in out
  assert 'took over the stale lock' in out and 'is gone' in out, out[-3000:]
  a, b = _flat(checkpointing.load_params(straight)), _flat(checkpointing.load_params(killed))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  # The rows logged after the step-2 checkpoint were dropped before the rerun logged them
  # again: one row per step, with the values of the uninterrupted run (resume is exact).
  with open(os.path.join(straight, 'metrics.jsonl')) as f:
    expected = [json.loads(line) for line in f]
  with open(curves) as f:
    rows = [json.loads(line) for line in f]
  assert [r['step'] for r in rows] == [1, 2, 3, 4, 5, 6]
  assert rows == expected

  # Lowering total_steps below the saved step: one line naming the key, exit 2, nothing changed.
  before = sorted(os.listdir(os.path.join(straight, 'checkpoints')))
  p = _main(straight, data_dir, extra=['--config.total_steps=4'])
  out = p.communicate(timeout=300)[0]
  assert p.returncode == 2, out[-3000:]
  assert 'holds step 6, past config.total_steps=4' in out and 'Traceback' not in out, out[-3000:]
  assert sorted(os.listdir(os.path.join(straight, 'checkpoints'))) == before

  # A double start: the workdir's lock is held by a live process (this one). One line that
  # names it, exit 2, and not a byte of the workdir changed.
  files = lambda: {  # noqa: E731
      os.path.join(r, n): os.stat(os.path.join(r, n)).st_mtime_ns
      for r, _, names in os.walk(straight)
      for n in names
  }
  before = files()
  held = lock_lib.WorkdirLock(straight).acquire()
  p = _main(straight, data_dir, extra=['--config.total_steps=8'])
  out = p.communicate(timeout=300)[0]
  held.release()
  assert p.returncode == 2, out[-3000:]
  assert f'pid {os.getpid()}, started {held.record["started"]}' in out, out[-3000:]
  assert 'one run per workdir' in out and 'Traceback' not in out, out[-3000:]
  assert files() == before


def test_a_typo_in_eval_protocol_stops_the_run_before_any_data_is_read(tmp_path):
  config = _config(
      task='segment',
      **{'eval.protocol': 'cityscapes_halfs', 'data.data_dir': str(tmp_path / 'no_data_here')},
  )
  with pytest.raises(config_validation.ConfigError, match=r'config\.eval\.protocol'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'no_data_here')


class _SigtermAt(Batches):
  """Batches whose process receives SIGTERM while it reads the batch of step `at`."""

  def __init__(self, at, **kw):
    super().__init__(**kw)
    self._at = at

  def __next__(self):
    if self._step + 1 == self._at:
      os.kill(os.getpid(), signal.SIGTERM)
    return super().__next__()


def test_sigterm_on_one_process_saves_that_step_and_a_rerun_resumes_exactly(tmp_path, monkeypatch):
  config = _config(total_steps=5, checkpoint_every=4)
  straight = train.train_and_evaluate(config, str(tmp_path / 'straight'), train_iter=Batches())
  workdir = str(tmp_path / 'preempted')
  with pytest.raises(train.Preempted, match='at step 3/5: every process saved step 3'):
    train.train_and_evaluate(config, workdir, train_iter=_SigtermAt(3))
  assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # The handler is removed again.
  assert sorted(
      int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')) if s.isdigit()
  ) == [3]
  # The rerun takes its whole state from the checkpoint: no fresh state is made, so no
  # initialisation and no read of init_from/init_encoder_from (initial_params).
  fresh = []
  for module, name in ((train, 'create_train_state'), (initialization, 'initial_params')):
    monkeypatch.setattr(module, name, lambda *a, name=name, **k: fresh.append(name))
  resumed = train.train_and_evaluate(config, workdir, train_iter=Batches())
  assert fresh == []
  a, b = _flat(straight.params), _flat(resumed.params)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope='module')
def saved_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('saved') / 'run')
  train.train_and_evaluate(_config(), workdir, train_iter=Batches())
  return workdir


def _truncate_largest_array_file(step_dir):
  files = [
      os.path.join(r, n)
      for r, _, names in os.walk(os.path.join(step_dir, 'state'))
      for n in names
      if os.sep + 'd' + os.sep in os.path.join(r, n) + os.sep
  ]
  largest = max(files, key=os.path.getsize)
  with open(largest, 'r+b') as f:
    f.truncate(100)
  return largest


@pytest.mark.parametrize(
    'damage', ['truncated array file', 'no _METADATA', 'no manifest.ocdbt', 'bad data state']
)
def test_damaged_checkpoint_names_the_step_and_file_and_deletes_nothing(
    saved_run, tmp_path, damage
):
  workdir = str(tmp_path / 'run')
  shutil.copytree(saved_run, workdir)
  step_dir = os.path.join(workdir, 'checkpoints', '2')
  if damage == 'truncated array file':
    bad, what = _truncate_largest_array_file(step_dir), 'truncated to 100 bytes'
  elif damage == 'no _METADATA':
    bad, what = os.path.join(step_dir, 'state', '_METADATA'), 'missing'
    os.remove(bad)
  elif damage == 'no manifest.ocdbt':
    bad, what = os.path.join(step_dir, 'state', 'manifest.ocdbt'), 'missing (the index'
    os.remove(bad)
  else:
    bad = os.path.join(step_dir, 'data', 'metadata')
    what = 'unreadable input-pipeline state'
    with open(bad, 'w') as f:
      f.write('{"position": 8, garbage')
  before = sorted(os.path.join(r, n) for r, _, names in os.walk(workdir) for n in names)
  with open(os.path.join(workdir, 'config.json')) as f:
    config_before = f.read()
  with pytest.raises(checkpointing.CheckpointError) as e:
    train.train_and_evaluate(_config(total_steps=3), workdir, train_iter=Batches())
  with open(os.path.join(workdir, 'config.json')) as f:
    assert f.read() == config_before  # The failed resume's config (total_steps=3) is not kept.
  message = str(e.value)
  assert message.startswith(f'cannot resume from checkpoint {step_dir}: {bad}: {what}'), message
  assert 'Nothing was deleted; the previous complete step is 1' in message
  after = sorted(os.path.join(r, n) for r, _, names in os.walk(workdir) for n in names)
  assert [f for f in before if f not in after] == []


def test_checkpoints_of_the_old_layout_with_data_state_dir_still_resume(saved_run, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(saved_run, workdir)
  # Before the 'data' item, each process wrote checkpoints/data_state/<step>/process_<i>.json.
  for step in ('1', '2'):
    item = os.path.join(workdir, 'checkpoints', step, 'data')
    with open(os.path.join(item, 'metadata')) as f:
      state = json.load(f)['process_0']
    legacy = os.path.join(workdir, 'checkpoints', 'data_state', step)
    os.makedirs(legacy)
    with open(os.path.join(legacy, 'process_0.json'), 'w') as f:
      json.dump(state, f)
    shutil.rmtree(item)
  batches = Batches()
  result = train.train_and_evaluate(_config(total_steps=3), workdir, train_iter=batches)
  assert result.step == 3 and batches.get_state() == {'step': 3}  # Resumed at step 2.


def test_label_count_runs_record_the_drawn_count_and_its_fraction_of_the_split():
  """results.json of a `label_count=` run: the subset's size and size / split, not 100%."""
  config = common.base_config()
  drawn = type('It', (), dict(subset_ids=[str(i) for i in range(11)], split_num_examples=24))()
  config.data.label_count = 11
  assert train._label_fraction(config, drawn) == pytest.approx(11 / 24)
  assert train._label_count(config, drawn) == 11
  config.data.label_count = 0
  config.data.label_fraction = 0.25
  assert train._label_fraction(config, drawn) == 0.25
  assert train._label_count(config, drawn) is None


def test_skipped_examples_for_results_json_count_every_drop_and_name_each_id_once():
  train_iter = types.SimpleNamespace(bad_example_ids=['b', 'a'], num_bad_examples=5)
  eval_iter = types.SimpleNamespace(bad_example_ids=['c'], num_bad_examples=1)
  assert train.skipped_examples(train_iter, eval_iter) == {
      'num_train': 5,
      'train_ids': ['a', 'b'],
      'num_eval': 1,
      'eval_ids': ['c'],
  }
  assert train.skipped_examples(object(), None) == {
      'num_train': 0,
      'train_ids': [],
      'num_eval': 0,
      'eval_ids': [],
  }


class _Killed(BaseException):
  """Stands for a SIGKILL: nothing after it runs (not even `except Exception`)."""


def _rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _best_step(workdir):
  return [int(s) for s in os.listdir(os.path.join(workdir, 'best')) if s.isdigit()]


@pytest.fixture(scope='module')
def evaluated_run(tmp_path_factory):
  """An uninterrupted denoise run that evaluates (and saves best/) every 2 steps."""
  root = tmp_path_factory.mktemp('evaluated')
  config = _config(total_steps=6, checkpoint_every=2, eval_every=2)
  config.eval.denoise_images = 2
  config.data.prepare, config.data.data_dir = True, str(root / 'data')
  workdir = str(root / 'straight')
  train.train_and_evaluate(config, workdir, train_iter=Batches())
  return config, workdir


@pytest.mark.parametrize('kill_at', [4, 6])  # An in-loop evaluation, and the final one.
def test_a_kill_during_a_best_save_loses_no_best_and_duplicates_no_row(
    evaluated_run, tmp_path, monkeypatch, kill_at
):
  config, straight = evaluated_run
  workdir = str(tmp_path / 'killed')
  save_best = checkpointing.Checkpointer.save_best

  def killed_mid_save(self, step, state, value):
    if step != kill_at:
      return save_best(self, step, state, value)
    self.wait()  # The case: checkpoints/<step> is complete, best/<step> is not.
    os.makedirs(os.path.join(workdir, 'best', f'{step}.orbax-checkpoint-tmp', 'state'))
    raise _Killed()

  monkeypatch.setattr(checkpointing.Checkpointer, 'save_best', killed_mid_save)
  with pytest.raises(_Killed):
    train.train_and_evaluate(config, workdir, train_iter=Batches())
  monkeypatch.setattr(checkpointing.Checkpointer, 'save_best', save_best)
  assert checkpointing.Checkpointer(workdir, keep=3).latest_step() == kill_at

  train.train_and_evaluate(config, workdir, train_iter=Batches())
  assert not [n for n in os.listdir(os.path.join(workdir, 'best')) if 'tmp' in n]
  assert _best_step(workdir) == _best_step(straight)
  a = _flat(checkpointing.load_params(os.path.join(straight, 'best')))
  b = _flat(checkpointing.load_params(os.path.join(workdir, 'best')))
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  # One row per (step, kind), with the uninterrupted run's values, in its order.
  assert _rows(workdir) == _rows(straight)


def _edit_data_state(workdir, edit):
  path = os.path.join(workdir, 'checkpoints', '2', 'data', 'metadata')
  with open(path) as f:
    states = json.load(f)
  states['process_0'] = edit(states['process_0'])
  with open(path, 'w') as f:
    json.dump(states, f)
  return path


@pytest.mark.parametrize(
    'damage,what',
    [
        ('a list', 'a JSON list, not an object'),
        ('another step', "its step 7 is not the checkpoint's 2"),
        ('no data item', 'missing (the input pipeline position'),
    ],
)
def test_a_bad_saved_input_position_names_the_file_and_the_step_to_fall_back_to(
    saved_run, tmp_path, damage, what
):
  workdir = str(tmp_path / 'run')
  shutil.copytree(saved_run, workdir)
  if damage == 'a list':
    path = _edit_data_state(workdir, lambda s: [s])
  elif damage == 'another step':
    path = _edit_data_state(workdir, lambda s: {**s, 'step': 7})
  else:
    path = os.path.join(workdir, 'checkpoints', '2', 'data')
    shutil.rmtree(path)
  with pytest.raises(checkpointing.CheckpointError) as e:
    train.train_and_evaluate(_config(total_steps=3), workdir, train_iter=Batches())
  message = str(e.value)
  assert os.path.dirname(path.rstrip('/')) in message and what in message, message
  assert 'move' in message and 'aside to resume from it' in message, message


def test_a_missing_pretrained_file_is_named_before_the_workdir_is_created(tmp_path):
  workdir = tmp_path / 'run'
  config = _config(init_encoder_from=str(tmp_path / 'nope.npz'))
  with pytest.raises(pretrained.CheckpointError, match='nope.npz: checkpoint file does not exist'):
    train.train_and_evaluate(config, str(workdir), train_iter=Batches())
  config = _config(init_from=str(tmp_path / 'no_run'))
  with pytest.raises(checkpointing.CheckpointError, match=r'config\.init_from: .*no_run does not'):
    train.train_and_evaluate(config, str(workdir), train_iter=Batches())
  assert not workdir.exists()
