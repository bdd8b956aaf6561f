"""The main job, end to end at its quick size: every stage runs, reruns reuse them."""

import json
import os
import subprocess
import sys

from ddep import demo
from ddep.config import validation as config_validation
from ddep.reporting import paired_stats
import tiny_runs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_stages_are_valid_configs_wired_to_their_pretraining():
  runs = demo.stage_configs(
      '/out',
      quick=False,
      pretrain_steps=500,
      finetune_steps=200,
      fractions=['0.02', '0.1', '1.0'],
      seeds=3,
      middle_seeds=2,
      full_seeds=4,
  )
  names = [n for n, _, _ in runs]
  assert names[:3] == ['pretrain_supervised', 'pretrain_dep', 'pretrain_ddep']
  # 3 seeds at the lowest fraction, 2 in between, 4 at 100%.
  assert len(names) == 3 + (3 + 2 + 4) * 4
  assert 'finetune_dep_f1.0_s3' in names and 'finetune_dep_f0.1_s2' not in names
  by_name = {n: c for n, _, c in runs}
  for config in by_name.values():
    config_validation.validate(config, num_devices=1)
  assert by_name['pretrain_dep'].denoise.sigma == demo.DEP_SIGMA
  assert by_name['pretrain_dep'].denoise.target == demo.DEP_TARGET
  assert by_name['finetune_none_f1.0_s0'].optim.lr == demo.FINETUNE_LRS['none']
  assert by_name['finetune_ddep_f1.0_s0'].optim.lr == demo.FINETUNE_LRS['ddep']
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
  assert 'finetune_none_f0.1_s2' not in by_name and 'finetune_none_f1.0_s2' in by_name
  assert all(c.data.eval_split == '' for n, c in by_name.items() if n.startswith('finetune_'))
  # Paired: one seed means one subset and one initialisation seed for every method.
  for seed in range(3):
    same = [by_name[f'finetune_{m}_f0.02_s{seed}'] for m in demo.METHODS]
    assert {(c.data.subset_seed, c.seed) for c in same} == {(seed, seed)}
  assert demo.dependencies(runs)['finetune_ddep_f1.0_s0'] == {'pretrain_ddep'}
  assert demo.dependencies(runs)['pretrain_ddep'] == {'pretrain_supervised'}
  assert demo.dependencies(runs)['finetune_none_f1.0_s0'] == set()


def test_the_base_seed_moves_initialisation_and_data_order_not_the_subsets():
  kwargs = dict(quick=False, pretrain_steps=5, finetune_steps=5, fractions=['0.02', '1.0'], seeds=2)
  a = {n: c for n, _, c in demo.stage_configs('/out', **kwargs)}
  b = {n: c for n, _, c in demo.stage_configs('/out', base_seed=1, **kwargs)}
  assert a.keys() == b.keys()
  for name in a:
    assert a[name].seed != b[name].seed, name
    assert a[name].data.subset_seed == b[name].data.subset_seed, name


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


def test_two_workers_run_each_stage_once_after_the_stages_it_starts_from(tmp_path):
  """The pool of worker processes, on stand-in stages that only record when and where they
  ran (the real stages run in the end-to-end test below, in one process)."""
  runs = demo.stage_configs(str(tmp_path), quick=True, **demo.BUDGETS['quick'])
  lines = []
  demo.run_stages(
      runs, output=str(tmp_path), workers=2, log=lines.append, run_one=tiny_runs.stub_stage
  )
  ran = {name: json.loads((tmp_path / 'runs' / name / 'DONE').read_text()) for name, _, _ in runs}
  assert len({r['pid'] for r in ran.values()}) == 2  # Two worker processes, not this one.
  assert os.getpid() not in {r['pid'] for r in ran.values()}
  for name, needs in demo.dependencies(runs).items():
    for need in needs:
      assert ran[need]['ended'] <= ran[name]['started'], (need, name)
  events = sorted(
      [(r['started'], 1) for r in ran.values()] + [(r['ended'], -1) for r in ran.values()]
  )
  running = [sum(d for _, d in events[: i + 1]) for i in range(len(events))]
  assert max(running) == 2  # Stages ran side by side, never more than the workers.
  assert sum('done in' in line for line in lines) == len(runs) == 11

  lines.clear()  # A rerun runs nothing: every stage says DONE.
  demo.run_stages(
      runs, output=str(tmp_path), workers=2, log=lines.append, run_one=tiny_runs.stub_stage
  )
  assert sum('already done' in line for line in lines) == len(runs)
  assert not any('done in' in line for line in lines)


def test_quick_demo_runs_every_stage_and_reuses_them(tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO)
  # One worker: the stages share compiled steps in one process (the pool is tested above).
  cmd = [sys.executable, '-m', 'ddep.demo', '--quick', '--workers=1', f'--output={tmp_path}']
  first = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
  for name in (
      'results.md',
      'results.json',
      'denoising.png',
      'denoising_ddep.png',
      'segmentation.png',
      'miou_vs_fraction_demo_tiny_1x.png',
  ):
    assert (tmp_path / name).stat().st_size > 0, name
  table = (tmp_path / 'results.md').read_text()
  for method in ('No pretraining', 'Supervised', 'DeP', 'DDeP'):
    assert f'| {method} |' in table
  assert "The paper's claims" in table and '95% t-interval' in table
  stages = 3 + 2 * 4  # 2 seeds at one fraction
  assert f'| all | {stages} |' in table
  assert '(job: elapsed' in first.stdout and 'ETA' in first.stdout
  assert '1 worker process(es)' in first.stdout

  results = json.loads((tmp_path / 'results.json').read_text())
  entries = results['finetunes']
  assert len(entries) == 2 * 4
  assert set(entries[0]) >= {
      'method',
      'fraction',
      'label_count',
      'subset_seed',
      'subset_ids_sha1',
      'miou',
  }
  for e in entries:  # The recorded subset is the one the run trained on.
    ids = tmp_path / 'runs' / e['run'] / 'subset_ids.txt'
    lines = ids.read_text().splitlines()
    assert len(lines) == e['label_count'] == 12  # half of demo_tiny's 24 train images
    assert paired_stats.subset_sha1(lines) == e['subset_ids_sha1']
  by_seed = {}
  for e in entries:
    by_seed.setdefault((e['fraction'], e['subset_seed']), set()).add(e['subset_ids_sha1'])
  assert all(len(v) == 1 for v in by_seed.values())  # every method, the same images
  assert len({by_seed[(0.5, s)].pop() for s in (0, 1)}) == 2  # seeds draw other subsets
  claims = {(c['better'], c['worse']): c for c in results['claims']}
  # The quick budget has no 100% runs, so the all-label claim (supervised - DeP) is left out.
  assert set(claims) == {('dep', 'none'), ('ddep', 'none'), ('ddep', 'supervised')}
  assert claims[('dep', 'none')]['n'] == 2
  assert claims[('dep', 'none')]['verdict'] in ('holds', 'reversed', 'within noise')

  second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
  assert second.stdout.count('already done') == stages
  assert json.loads((tmp_path / 'results.json').read_text())['finetunes'] == entries


def test_default_budget_is_a_curve_with_five_paired_seeds_at_its_ends():
  b = demo.BUDGETS['default']
  runs = demo.stage_configs(
      '/out',
      quick=False,
      pretrain_steps=b['pretrain_steps'],
      finetune_steps=b['finetune_steps'],
      fractions=b['fractions'],
      seeds=b['seeds'],
      middle_seeds=b['middle_seeds'],
      full_seeds=b['full_seeds'],
  )
  fractions = sorted({float(f) for f in b['fractions']})
  assert len(fractions) >= 3 and fractions[-1] == 1.0
  for method in demo.METHODS:
    for fraction in fractions:
      seeds = {
          c.data.subset_seed
          for n, _, c in runs
          if n.startswith(f'finetune_{method}_') and c.data.label_fraction == fraction
      }
      assert len(seeds) >= (5 if fraction in (fractions[0], 1.0) else 2), (method, fraction)


def test_stage_cost_and_seconds_table():
  runs = demo.stage_configs(
      '/out', quick=True, pretrain_steps=6, finetune_steps=4, fractions=['1.0'], seeds=1
  )
  assert demo.SUPERVISED_STEPS_FACTOR == 0.5  # the table's supervised stage: 3 steps
  name, _, config = runs[-1]
  assert demo.stage_cost(config) == 4 * 8 * 32 * 32
  table = demo.stage_seconds_table(runs, {n: 2.0 for n, _, _ in runs})
  assert '| pretrain_dep | 1 | 2 |' in table and '| all | 7 | 14 |' in table
