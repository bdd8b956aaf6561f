"""Launch scripts: the commands they would run (--dry_run), parsed back into words,
and the sweep's expansion of the paper's tables into runs."""

import collections
import importlib
import importlib.util
import os
import pathlib
import re
import shlex
import shutil
import stat
import subprocess
import sys

from absl import app
from absl import flags
import pytest

from ddep.config import validation as config_validation

REPO = pathlib.Path(__file__).resolve().parents[1]
TPU = str(REPO / 'launch' / 'tpu.sh')
SLURM = str(REPO / 'launch' / 'slurm.sbatch')
SWEEP = str(REPO / 'launch' / 'sweep.py')


def _sweep_module():
  spec = importlib.util.spec_from_file_location('ddep_sweep', SWEEP)
  module = importlib.util.module_from_spec(spec)
  sys.modules['ddep_sweep'] = module  # dataclasses look their module up by name
  spec.loader.exec_module(module)
  return module


sweep = _sweep_module()


def _run(*argv, env=None, check=True):
  out = subprocess.run(list(argv), capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
  if check:
    assert out.returncode == 0, out.stderr
  return out


def _lines(*argv):
  """The dry run's commands, each split back into its words as a shell would."""
  return [shlex.split(line) for line in _run(*argv).stdout.splitlines()]


@pytest.mark.skipif(
    shutil.which('shellcheck') is None,
    reason='shellcheck is not installed (apt-get install shellcheck)',
)
def test_shell_scripts_are_shellcheck_clean():
  out = _run('shellcheck', '--severity=style', TPU, SLURM, check=False)
  assert out.returncode == 0, out.stdout


# ---------------------------------------------------------------------------
# TPU VMs.


@pytest.mark.parametrize(
    'accelerator,runtime',
    [
        ('v4-32', 'tpu-ubuntu2204-base'),
        ('v5litepod-16', 'v2-alpha-tpuv5-lite'),
        ('v5p-64', 'v2-alpha-tpuv5'),
    ],
)
def test_tpu_create(accelerator, runtime):
  assert _lines(
      'bash',
      TPU,
      'create',
      '--name=n',
      '--zone=us-z',
      f'--type={accelerator}',
      '--project=p',
      '--spot',
      '--dry_run',
  ) == [
      [
          'gcloud',
          'compute',
          'tpus',
          'tpu-vm',
          'create',
          'n',
          '--zone=us-z',
          '--project=p',
          f'--accelerator-type={accelerator}',
          f'--version={runtime}',
          '--spot',
      ]
  ]


def test_tpu_setup_installs_on_every_worker():
  archive, scp, ssh = _lines('bash', TPU, 'setup', '--name=n', '--zone=z', '--dry_run')
  assert archive[:2] == ['git', '-C'] and 'archive' in archive
  tarball = next(a.split('=', 1)[1] for a in archive if a.startswith('--output='))
  assert scp == [
      'gcloud',
      'compute',
      'tpus',
      'tpu-vm',
      'scp',
      tarball,
      'n:ddep.tar.gz',
      '--worker=all',
      '--zone=z',
  ]
  assert ssh[:7] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'n', '--zone=z']
  assert '--worker=all' in ssh
  remote = shlex.split(next(a for a in ssh if a.startswith('--command='))[len('--command=') :])
  pip = ['.venv/bin/pip', 'install', '-q', '-e', '.']
  assert any(remote[i : i + len(pip)] == pip for i in range(len(remote))), remote
  # The jax[tpu] it installs is setup.py's pinned jax, plus libtpu.
  pin = re.search(r'[\'"]jax==([^\'"]+)[\'"]', (REPO / 'setup.py').read_text()).group(1)
  assert f'jax[tpu]=={pin}' in remote
  assert 'gs://vit_models/imagenet21k/R50+ViT-B_16.npz' in remote


def test_tpu_run_on_all_workers_keeps_every_word():
  config = "configs/finetune_cityscapes.py:method=ddep,fraction=1/30,init_from=gs://b/it's here"
  (ssh,) = _lines(
      'bash',
      TPU,
      'run',
      '--name=n',
      '--zone=z',
      f'--config={config}',
      '--workdir=gs://b/w',
      '--data_dir=gs://b/tfds',
      '--dry_run',
      '--',
      '--config.seed=3',
  )
  assert ssh[:9] == [
      'gcloud',
      'compute',
      'tpus',
      'tpu-vm',
      'ssh',
      'n',
      '--zone=z',
      '--worker=all',
      ssh[8],
  ]
  remote = shlex.split(ssh[8][len('--command=') :])
  assert remote == [
      'cd',
      'ddep',
      '&&',
      '.venv/bin/python',
      '-m',
      'ddep.main',
      f'--config={config}',
      '--workdir=gs://b/w',
      '--config.data.data_dir=gs://b/tfds',
      '--config.seed=3',
  ]


def test_tpu_run_in_background_logs_per_workdir():
  (ssh,) = _lines(
      'bash',
      TPU,
      'run',
      '--name=n',
      '--zone=z',
      '--config=configs/x.py',
      '--workdir=gs://b/runs/ddep_w1',
      '--background',
      '--dry_run',
  )
  remote = shlex.split(ssh[-1][len('--command=') :])
  assert remote[remote.index('>') + 1] == 'logs/ddep_w1.log'
  assert remote[-1] == '&' and 'nohup' in remote


@pytest.mark.parametrize(
    'argv',
    [
        ['run', '--zone=z', '--config=c', '--workdir=w'],  # no name
        ['create', '--name=n', '--zone=z'],  # no type
        ['create', '--name=n', '--zone=z', '--type=v9-8'],  # unknown generation
        ['run', '--name=n', '--zone=z', '--workdir=w'],  # no config
        ['start', '--name=n', '--zone=z'],  # no such command
    ],
)
def test_tpu_bad_usage_exits_2(argv):
  env = {k: v for k, v in os.environ.items() if k not in ('TPU_NAME', 'TPU_ZONE')}
  out = _run('bash', TPU, *argv, '--dry_run', env=env, check=False)
  assert out.returncode == 2 and not out.stdout


# ---------------------------------------------------------------------------
# SLURM.


def test_slurm_runs_one_process_per_gpu():
  header = dict(re.findall(r'^#SBATCH --([\w-]+)=(\S+)', pathlib.Path(SLURM).read_text(), re.M))
  # jax.distributed's SLURM detection gives each process the GPU of its local rank.
  assert header['ntasks-per-node'] == header['gpus-per-node']
  (srun,) = _lines(
      'bash',
      SLURM,
      '--dry_run',
      '--config=configs/pretrain_ade20k.py:method=ddep',
      '--workdir=/shared/w',
      '--config.data.data_dir=/a dir',
  )
  assert srun[0] == 'srun' and '--gpu-bind=none' in srun
  assert srun[srun.index('-m') - 1 :] == [
      '.venv/bin/python',
      '-m',
      'ddep.main',
      '--config=configs/pretrain_ade20k.py:method=ddep',
      '--workdir=/shared/w',
      '--config.data.data_dir=/a dir',
  ]


def test_slurm_needs_config_and_workdir():
  out = _run('bash', SLURM, '--dry_run', '--workdir=/w', check=False)
  assert out.returncode == 2 and 'usage' in out.stderr


# ---------------------------------------------------------------------------
# Sweeps.


def _args(run):
  return dict(kv.split('=', 1) for kv in run.arg.split(','))


def test_table1_expands_to_the_papers_runs():
  runs = sweep.expand(sweep.GRIDS['table1'], '/r')
  pretrain = [r for r in runs if 'pretrain' in r.config]
  assert [(r.config, r.arg) for r in pretrain] == [
      ('configs/pretrain_cityscapes.py', 'method=dep,width=1'),
      ('configs/pretrain_cityscapes.py', 'method=ddep,width=1'),
      ('configs/pretrain_cityscapes.py', 'method=ddep,width=2'),
  ]
  assert runs[:3] == pretrain  # pretraining first
  finetune = runs[3:]
  # 7 rows (4 methods at 1x, 3 at 2x) x (10 + 4 + 6 + 10) runs (Sec. 4.3).
  assert len(finetune) == 7 * 30
  per_cell = collections.Counter(
      (_args(r)['method'], _args(r)['width'], _args(r)['fraction']) for r in finetune
  )
  assert per_cell[('ddep', '2', '1/30')] == 10 and per_cell[('dep', '1', '1/8')] == 6
  assert per_cell[('supervised', '2', '1/4')] == 4 and ('dep', '2', '1') not in per_cell
  assert len({r.workdir for r in runs}) == len(runs)
  for r in finetune:
    a = _args(r)
    if a['method'] in ('dep', 'ddep'):
      (source,) = [p for p in pretrain if p.workdir == a['init_from']]
      assert _args(source)['method'] == a['method'] and _args(source)['width'] == a['width']
    else:
      assert 'init_from' not in a


def test_ablation_grids_vary_only_pretraining():
  t6 = sweep.expand(sweep.GRIDS['table6'], '/r', stage='pretrain')
  assert [r.arg for r in t6] == [
      'method=ddep,width=3,sigma_range=0.2:0.3',
      'method=ddep,width=3,sigma=0.2',
  ]
  t7 = sweep.expand(sweep.GRIDS['table7'], '/r', stage='pretrain')
  assert {(r.config, _args(r)['target']) for r in t7} == {
      (f'configs/pretrain_{d}.py', t) for d in ('pascal_context', 'ade20k') for t in ('x', 'eps')
  }
  f8 = sweep.expand(sweep.GRIDS['fig8'], '/r', stage='pretrain')
  assert len(f8) == len(sweep.FIG8_EPOCHS) * len(sweep.FIG8_LRS)
  t5 = sweep.expand(sweep.GRIDS['table5'], '/r', seeds='1', fractions_=['0.01'])
  assert {_args(r)['model'] for r in t5} == {'bit_r50_unet'}
  assert [r.name for r in t5 if 'pretrain' in r.config] == [
      'pretrain/pascal_context/ddep_w1_bit_r50_unet'
  ]


def test_hparam_sweep_names_each_run():
  runs = sweep.expand(
      sweep.GRIDS['table1'],
      '/r',
      methods=['ddep'],
      widths=[1],
      seeds='1',
      fractions_=['1/30'],
      lrs=['1e-5', '3e-4'],
      wds=['1e-4'],
      stage='finetune',
  )
  assert [r.name for r in runs] == [
      'finetune/cityscapes/ddep_w1/f1of30_s0_lr1e-5_wd1e-4',
      'finetune/cityscapes/ddep_w1/f1of30_s0_lr3e-4_wd1e-4',
  ]
  assert _args(runs[1])['lr'] == '3e-4' and _args(runs[1])['wd'] == '1e-4'


def test_every_sweep_run_is_a_valid_full_size_config():
  """Each distinct (config, argument but seed) of every grid builds and validates."""
  seen = set()
  for grid in sweep.GRIDS.values():
    for run in sweep.expand(grid, '/r', seeds='1', lrs=['3e-4'], wds=['1e-5']):
      if (run.config, run.arg) in seen:
        continue
      seen.add((run.config, run.arg))
      module = importlib.import_module(f'configs.{pathlib.Path(run.config).stem}')
      config_validation.validate(module.get_config(run.arg), num_devices=8)
  assert len(seen) > 100


def _sweep(*argv):
  """launch/sweep.py in-process, as its __main__ runs it: `--` split off, then absl parses."""
  flag_values = flags.FlagValues()
  sweep.define_flags(flag_values)
  own, passthrough = sweep.split_passthrough(['sweep.py', *argv])
  return sweep.main(flag_values(own), flag_values, extra_flags=passthrough)


def test_sweep_dry_run_local_and_tpu(capsys):
  # The one launch of the script itself: its `--` passthrough as a user types it.
  lines = _lines(
      sys.executable,
      SWEEP,
      'table2',
      '--workdir_root',
      '/r',
      '--seeds=1',
      '--fractions=1',
      '--python=python',
      '--dry_run',
      '--',
      '--config.seed=5',
  )
  assert lines == [
      [
          'python',
          '-m',
          'ddep.main',
          '--config=configs/pretrain_cityscapes.py:method=ddep,width=2',
          '--workdir=/r/pretrain/cityscapes/ddep_w2',
          '--config.seed=5',
      ],
      [
          'python',
          '-m',
          'ddep.main',
          '--config=configs/finetune_cityscapes.py:method=ddep,width=2,fraction=1,seed=0,'
          'init_from=/r/pretrain/cityscapes/ddep_w2',
          '--workdir=/r/finetune/cityscapes/ddep_w2/f1_s0',
          '--config.seed=5',
      ],
  ]
  assert (
      _sweep(
          'table2',
          '--workdir_root=gs://b/r',
          '--seeds=1',
          '--fractions=1',
          '--launcher=tpu',
          '--tpu_name=n',
          '--zone=z',
          '--dry_run',
      )
      == 0
  )
  tpu = [shlex.split(line) for line in capsys.readouterr().out.splitlines()]
  assert [line[:4] for line in tpu] == [['launch/tpu.sh', 'run', '--name=n', '--zone=z']] * 2
  with pytest.raises(flags.IllegalFlagValueError, match='--tpu_name and --zone'):
    _sweep('table2', '--workdir_root=/r', '--launcher=tpu', '--dry_run')
  with pytest.raises(app.UsageError, match='give one grid of fig2, .*table7'):
    _sweep('table9', '--workdir_root=/r', '--dry_run')


def _fake_tool(directory, name, body):
  path = directory / name
  path.write_text('#!/usr/bin/env bash\n' + body)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_sweep_slurm_chains_finetuning_after_its_pretraining(tmp_path, monkeypatch):
  """Runs the sweep against a fake sbatch that hands out job ids 100, 101, ..."""
  log = tmp_path / 'sbatch.log'
  _fake_tool(
      tmp_path,
      'sbatch',
      f'n=$(wc -l < {log} 2>/dev/null || echo 0)\n' f'echo "$*" >> {log}\necho $((100 + n))\n',
  )
  monkeypatch.setenv('PATH', f'{tmp_path}:{os.environ["PATH"]}')
  monkeypatch.chdir(REPO)
  assert (
      _sweep(
          'table1',
          '--workdir_root=/r',
          '--methods=dep,ddep',
          '--widths=1',
          '--seeds=1',
          '--fractions=1/30',
          '--launcher=slurm',
      )
      == 0
  )
  calls = log.read_text().splitlines()
  job_of = {re.search(r'--workdir=(\S+)', c).group(1): 100 + i for i, c in enumerate(calls)}
  assert len(calls) == 4  # DeP and DDeP pretraining, then one fine-tuning each
  for call in calls[2:]:
    init = re.search(r'init_from=(\S+)', call).group(1)
    assert f'--dependency=afterok:{job_of[init]}' in call
    assert call.index('--dependency') < call.index('launch/slurm.sbatch')
  assert all('--dependency' not in c for c in calls[:2])


def test_sweep_local_runs_in_order(tmp_path, capsys):
  log = tmp_path / 'python.log'
  _fake_tool(tmp_path, 'fakepython', f'echo "$*" >> {log}\n')
  assert (
      _sweep('table7', '--workdir_root=/r', '--seeds=1', f'--python={tmp_path / "fakepython"}') == 0
  )
  calls = log.read_text().splitlines()
  assert len(calls) == 8 and all(c.startswith('-m ddep.main --config=configs/') for c in calls)
  assert [('configs/pretrain_' in c) for c in calls] == [True] * 4 + [False] * 4
  assert capsys.readouterr().out.count('+ ') == 8  # Each command is echoed before it runs.
