"""The ddep.main command line: configs load by any path, and --dry_run."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dry_run(cwd, *args):
  # No PYTHONPATH: the installed package alone must be enough, as for a user's own directory.
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  return subprocess.run(
      [sys.executable, '-m', 'ddep.main', '--dry_run', *args],
      cwd=cwd,
      env=env,
      capture_output=True,
      text=True,
      timeout=120,
  )


def test_dry_run_of_a_config_by_absolute_path_from_another_directory(tmp_path):
  config = os.path.join(REPO, 'configs', 'finetune_ade20k.py')
  workdir = tmp_path / 'run'
  p = _dry_run(
      tmp_path,
      f'--config={config}:method=none,count=20,runlocal',
      f'--workdir={workdir}',
      '--config.optim.lr=0.000125',
  )
  assert p.returncode == 0, p.stderr[-3000:]
  # The resolved config: the experiment's arguments, runlocal and the override applied.
  for line in (
      'dataset: demo_tiny',
      'label_count: 20',
      'lr: 0.000125',
      'preset: tiny',
      'task: segment',
  ):
    assert f'\n  {line}\n' in p.stdout or f'\n{line}\n' in p.stdout, (line, p.stdout)
  assert 'config valid for' in p.stdout
  assert not workdir.exists()

  p = _dry_run(
      tmp_path,
      f'--config={config}:method=none,runlocal',
      f'--workdir={workdir}',
      '--config.eval.protocol=sliding',
  )
  assert p.returncode == 2
  assert "ddep.main: error: config.eval.protocol: unknown protocol 'sliding'" in p.stderr, p.stderr[
      -3000:
  ]
  assert p.stderr.count("'whole'") == 1  # Each choice listed once.
  assert not workdir.exists()
