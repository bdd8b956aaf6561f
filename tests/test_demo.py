"""The main job, end to end at its quick size: every stage runs, reruns reuse them."""

import os
import subprocess
import sys

from ddep import config_validation
from ddep import demo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_stages_are_valid_configs_wired_to_their_pretraining():
  runs = demo.stage_configs(
      '/out',
      quick=False,
      pretrain_steps=500,
      finetune_steps=200,
      fractions=['0.02', '1.0'],
      seeds=2,
  )
  names = [n for n, _, _ in runs]
  assert names[:3] == ['pretrain_supervised', 'pretrain_dep', 'pretrain_ddep']
  assert len(names) == 3 + (2 + 1) * 4  # one run at 100%: every seed picks the same subset
  by_name = {n: c for n, _, c in runs}
  for config in by_name.values():
    config_validation.validate(config, num_devices=1)
  assert by_name['pretrain_dep'].denoise.sigma == demo.DEP_SIGMA
  assert not by_name['pretrain_dep'].frozen
  ddep = by_name['pretrain_ddep']
  assert ddep.denoise.sigma == 0.1 and ddep.frozen == ('encoder/.*',)
  assert ddep.init_from == '/out/runs/pretrain_supervised'
  ft = by_name['finetune_ddep_f0.02_s1']
  assert (ft.task, ft.init_from, ft.data.label_fraction, ft.data.subset_seed) == (
      'segment',
      '/out/runs/pretrain_ddep',
      0.02,
      1,
  )
  assert by_name['finetune_none_f1.0_s0'].init_from == ''
  assert 'finetune_none_f1.0_s1' not in by_name
  assert all(c.data.eval_split == '' for n, c in by_name.items() if n.startswith('finetune_'))


def test_a_method_subset_runs_only_the_pretraining_it_needs_and_can_score_on_holdout():
  runs = demo.stage_configs(
      '/out',
      quick=False,
      pretrain_steps=5,
      finetune_steps=5,
      fractions=['0.02'],
      seeds=1,
      methods=['none', 'ddep'],
      eval_split='holdout',
      finetune_lr=1e-3,
  )
  names = [n for n, _, _ in runs]
  assert names == [
      'pretrain_supervised',
      'pretrain_ddep',
      'finetune_none_f0.02_s0',
      'finetune_ddep_f0.02_s0',
  ]
  assert {c.data.eval_split for _, _, c in runs[2:]} == {'holdout'}
  assert {c.optim.lr for _, _, c in runs[2:]} == {1e-3}
  try:
    demo.stage_configs(
        '/out',
        quick=True,
        pretrain_steps=1,
        finetune_steps=1,
        fractions=['1.0'],
        seeds=1,
        methods=['dpe'],
    )
  except ValueError as e:
    assert 'dpe' in str(e)
  else:
    raise AssertionError('an unknown method was accepted')


def test_quick_demo_runs_every_stage_and_reuses_them(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO)
  cmd = [sys.executable, '-m', 'ddep.demo', '--quick', f'--output={tmp_path}']
  first = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
  for name in (
      'results.md',
      'denoising.png',
      'denoising_ddep.png',
      'segmentation.png',
      'miou_vs_fraction_demo_tiny_1x.png',
  ):
    assert (tmp_path / name).stat().st_size > 0, name
  table = (tmp_path / 'results.md').read_text()
  for method in ('No pretraining', 'Supervised', 'DeP', 'DDeP'):
    assert f'| {method} |' in table
  assert "The paper's orderings" in table and '| all | 7 |' in table
  assert '(job: elapsed' in first.stdout and 'ETA' in first.stdout
  second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
  assert second.stdout.count('already done') == 3 + 4  # pretraining + one fraction x 4 methods


def test_default_budget_has_three_seeds_at_the_lowest_fraction():
  b = demo.BUDGETS['default']
  runs = demo.stage_configs(
      '/out',
      quick=False,
      pretrain_steps=b['pretrain_steps'],
      finetune_steps=b['finetune_steps'],
      fractions=b['fractions'],
      seeds=b['seeds'],
  )
  lowest = min(float(f) for f in b['fractions'])
  for method in demo.METHODS:
    seeds = {
        c.data.subset_seed
        for n, _, c in runs
        if n.startswith(f'finetune_{method}_') and c.data.label_fraction == lowest
    }
    assert len(seeds) >= 3, method


def test_stage_cost_and_seconds_table():
  runs = demo.stage_configs(
      '/out', quick=True, pretrain_steps=6, finetune_steps=4, fractions=['1.0'], seeds=1
  )
  name, _, config = runs[-1]
  assert demo.stage_cost(config) == 4 * 8 * 32 * 32
  table = demo.stage_seconds_table(runs, {n: 2.0 for n, _, _ in runs})
  assert '| pretrain_dep | 1 | 2 |' in table and '| all | 7 | 14 |' in table
