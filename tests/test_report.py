"""Tests for ddep.report on synthetic workdirs."""

import json
import re

from absl import flags
import numpy as np
import pytest
from PIL import Image

from ddep import report
from ddep.evaluators import metrics
from ddep.reporting import plots
from ddep.reporting import records
from ddep.reporting import tables
from ddep.reporting import visualisation
from ddep.runs import workdir as workdir_lib

METHODS = ('ddep', 'supervised')
FRACTIONS = (1.0, 0.1, 0.01)
SEEDS = (0, 1, 2)


def _report_main(argv):
  """`python -m ddep.report ARGV` in-process: flags parsed into a fresh FlagValues."""
  flag_values = flags.FlagValues()
  report.define_flags(flag_values)
  return report.main(flag_values(['ddep.report', *argv]), flag_values)


def make_runs(root):
  """3 seeds x 2 methods x 3 fractions of pascal_context_60, known mIoUs."""
  rng = np.random.default_rng(0)
  mious = {}
  for method in METHODS:
    for fraction in FRACTIONS:
      for seed in SEEDS:
        workdir = root / f'{method}_{fraction}_{seed}'
        workdir.mkdir(parents=True)
        miou = float(rng.uniform(0.1, 0.6))
        mious.setdefault((method, fraction), []).append(miou)
        cm = rng.integers(0, 50, size=(3, 3))
        m = metrics.segmentation_metrics(cm, ['background', 'aeroplane', 'bag'])
        m['miou'] = miou  # the value the table must reproduce.
        workdir_lib.write_results(
            workdir,
            method=method,
            dataset='pascal_context_60',
            label_fraction=fraction,
            subset_seed=seed,
            decoder_width=1,
            metrics=m,
        )
        with open(workdir / workdir_lib.CURVES_FILE, 'w') as f:
          for step in range(0, 500, 50):
            f.write(
                json.dumps(
                    {'step': step, 'train/loss': 2.0 / (1 + step), 'val/miou': miou * step / 450}
                )
                + '\n'
            )
          f.write('\n')  # blank lines are tolerated.
  return mious


def assert_png(path, min_width=200, min_height=150):
  with Image.open(path) as image:
    image.verify()  # a complete, decodable PNG.
  with Image.open(path) as image:
    assert image.format == 'PNG'
    width, height = image.size
    assert width >= min_width and height >= min_height, (path, image.size)
    pixels = np.asarray(image.convert('L'))
    assert pixels.std() > 1  # something was drawn.
  return width, height


def test_report_end_to_end(tmp_path, capsys):
  mious = make_runs(tmp_path / 'runs')
  (tmp_path / 'runs' / 'unfinished').mkdir()  # no results.json: skipped.
  out = tmp_path / 'report'
  assert _report_main([f"--workdirs={tmp_path / 'runs'}/*", f'--output={out}']) == 0
  assert '18 runs' in capsys.readouterr().out

  assert_png(out / 'miou_vs_fraction_pascal_context_60_1x.png', 400, 300)
  assert_png(out / 'table_pascal_context_60_1x.png')
  curves = sorted((out / 'curves').glob('*.png'))
  assert len(curves) == 18
  assert_png(curves[0])

  # The markdown table's numbers equal numpy's mean and sample std, x100.
  markdown = (out / 'summary.md').read_text()
  lines = [line for line in markdown.splitlines() if line.startswith('| ')]
  assert lines[0] == '| Method | 100% | 10% | 1% |'
  rows = {line.split(' | ')[0][2:]: line.strip(' |').split(' | ')[1:] for line in lines[1:]}
  assert list(rows) == ['Supervised', 'DDeP']  # paper order: baseline first.
  for method, label in (('ddep', 'DDeP'), ('supervised', 'Supervised')):
    for cell, fraction in zip(rows[label], FRACTIONS):
      mean, std, n = re.fullmatch(r'([\d.]+) ± ([\d.]+) \(n=(\d+)\)', cell).groups()
      values = np.array(mious[(method, fraction)])
      assert float(mean) == pytest.approx(100 * values.mean(), abs=0.005)
      assert float(std) == pytest.approx(100 * values.std(ddof=1), abs=0.005)
      assert int(n) == 3

  summary = json.loads((out / 'summary.json').read_text())
  entry = next(e for e in summary if e['method'] == 'ddep' and e['label_fraction'] == 0.01)
  assert entry['miou_mean'] == pytest.approx(np.mean(mious[('ddep', 0.01)]), rel=1e-12)
  assert entry['miou_std'] == pytest.approx(np.std(mious[('ddep', 0.01)], ddof=1), rel=1e-12)


def test_single_run_has_no_std_and_fractions_are_merged(tmp_path):
  runs = []
  for seed, fraction in enumerate((1 / 30, 0.0333333)):
    results = {
        'method': 'dep',
        'dataset': 'cityscapes',
        'label_fraction': fraction,
        'subset_seed': seed,
        'decoder_width': 2,
        'miou': 0.5 + 0.1 * seed,
    }
    runs.append(records.Run(tmp_path, results, []))
  runs.append(records.Run(tmp_path, dict(runs[0].results, label_fraction=0.25), []))
  summary = tables.summarize(runs)
  assert summary[('cityscapes', 2, 'dep', 0.0333)].values == (0.5, 0.6)
  single = summary[('cityscapes', 2, 'dep', 0.25)]
  assert single.n == 1 and np.isnan(single.std)
  assert '| DeP | 50.00 (n=1) | 55.00 ± 7.07 (n=2) |' in tables.markdown_summary(summary)
  plots.plot_miou_vs_fraction(summary, 'cityscapes', 2, tmp_path / 'fig.png')
  assert_png(tmp_path / 'fig.png')


def test_ablations_of_one_method_are_separate_rows(tmp_path):
  """Table 6/7-style runs: one method, pretrained differently; seeds of each averaged."""
  runs = []
  for sigma, target, mious in (
      (0.2, 'eps', (0.40, 0.42)),
      (0.2, 'x', (0.30,)),
      (0.25, 'eps', (0.50,)),
  ):
    for seed, miou in enumerate(mious):
      results = {
          'method': 'ddep',
          'dataset': 'ade20k',
          'label_fraction': 1.0,
          'subset_seed': seed,
          'decoder_width': 1,
          'miou': miou,
          'model': 'r50_vit_b16',
          'pretraining': {
              'workdir': f'/runs/{sigma}_{target}_{seed}',
              'sigma': sigma,
              'sigma_range': [],
              'target': target,
          },
      }
      runs.append(records.Run(tmp_path, results, []))
  plain = dict(runs[0].results, method='supervised', pretraining=None, miou=0.35)
  runs.append(records.Run(tmp_path, plain, []))
  summary = tables.summarize(runs)
  # Only what differs names a variant; where the run was does not.
  assert summary[('ade20k', 1, 'ddep [sigma=0.2, target=eps]', 1.0)].values == (0.40, 0.42)
  assert summary[('ade20k', 1, 'ddep [sigma=0.2, target=x]', 1.0)].values == (0.30,)
  assert summary[('ade20k', 1, 'ddep [sigma=0.25, target=eps]', 1.0)].values == (0.50,)
  assert summary[('ade20k', 1, 'supervised', 1.0)].values == (0.35,)
  table = tables.markdown_summary(summary)
  assert table.index('| Supervised |') < table.index('| DDeP [sigma=0.2, target=eps] |')
  plots.plot_table(summary, 'ade20k', 1, tmp_path / 'table.png')
  assert_png(tmp_path / 'table.png')


def test_pretraining_record_reads_the_run_config(tmp_path):
  workdir = tmp_path / 'pretrain'
  (workdir / 'checkpoints' / '40').mkdir(parents=True)
  config = {
      'method': 'ddep',
      'task': 'denoise',
      'total_steps': 40,
      'total_epochs': 0.0,
      'model': {'preset': 'r50_vit_b16', 'decoder_width_multiplier': 3},
      'denoise': {'sigma': 0.2, 'sigma_range': [0.2, 0.3], 'target': 'eps'},
  }
  (workdir / 'config.json').write_text(json.dumps(config))
  for init_from in (workdir, workdir / 'checkpoints' / '40'):
    record = workdir_lib.pretraining_record(str(init_from))
    assert record['workdir'] == str(workdir.resolve())
    assert (record['sigma_range'], record['decoder_width'], record['total_steps']) == (
        [0.2, 0.3],
        3,
        40,
    )
  assert workdir_lib.pretraining_record('') is None
  assert workdir_lib.pretraining_record(str(tmp_path / 'elsewhere')) is None


@pytest.mark.parametrize(
    'content,message',
    [
        ('{not json', 'not JSON'),
        (
            json.dumps(
                {
                    'method': 'ddep',
                    'dataset': 'ade20k',
                    'label_fraction': 0.1,
                    'subset_seed': 0,
                    'decoder_width': 1,
                }
            ),
            "missing 'miou'",
        ),
        (
            json.dumps(
                {
                    'method': 'ddep',
                    'dataset': 'ade20k',
                    'label_fraction': 0.1,
                    'subset_seed': 0,
                    'decoder_width': 1,
                    'miou': 48.6,
                }
            ),
            'not a fraction',
        ),
    ],
)
def test_bad_results_name_the_file(tmp_path, capsys, content, message):
  (tmp_path / 'run').mkdir()
  (tmp_path / 'run' / 'results.json').write_text(content)
  assert _report_main([f"--workdirs={tmp_path / 'run'}", f"--output={tmp_path / 'out'}"]) == 1
  err = capsys.readouterr().err
  assert message in err and str(tmp_path / 'run' / 'results.json') in err


def test_malformed_curve_line_is_reported(tmp_path):
  (tmp_path / 'metrics.jsonl').write_text('{"step": 1, "train/loss": 1.0}\n{"train/loss": 2}\n')
  with pytest.raises(records.ReportError, match='metrics.jsonl:2'):
    records.read_curves(tmp_path / 'metrics.jsonl')


def test_curves_of_a_resumed_run_keep_the_last_attempts_rows(tmp_path):
  # Killed after logging step 3 (and the eval at 2), resumed from the checkpoint at 2.
  rows = [
      (1, 'train/loss', 9),
      (2, 'train/loss', 8),
      (2, 'val/miou', 0.1),
      (3, 'train/loss', 7),
      (3, 'train/loss', 6),
      (4, 'train/loss', 5),
      (4, 'val/miou', 0.2),
      (4, 'val/miou', 0.3),
  ]
  (tmp_path / 'metrics.jsonl').write_text(
      ''.join(json.dumps({'step': s, k: v}) + '\n' for s, k, v in rows)
  )
  got = [
      (r['step'], *[(k, v) for k, v in r.items() if k != 'step'][0])
      for r in records.read_curves(tmp_path / 'metrics.jsonl')
  ]
  assert got == [
      (1, 'train/loss', 9),
      (2, 'train/loss', 8),
      (2, 'val/miou', 0.1),
      (3, 'train/loss', 6),
      (4, 'train/loss', 5),
      (4, 'val/miou', 0.3),
  ]
  # A row of an earlier step drops every later row of the attempt before it.
  (tmp_path / 'metrics.jsonl').write_text(
      ''.join(json.dumps({'step': s, 'train/loss': s}) + '\n' for s in (1, 2, 3, 4, 2, 3))
  )
  assert [r['step'] for r in records.read_curves(tmp_path / 'metrics.jsonl')] == [1, 2, 3]


def test_missing_workdir_is_an_error(tmp_path, capsys):
  assert _report_main([f"--workdirs={tmp_path / 'nothing'}", f"--output={tmp_path / 'out'}"]) == 1
  assert 'no results.json' in capsys.readouterr().err


def test_to_display_maps_and_clips():
  np.testing.assert_allclose(visualisation.to_display([-1.5, -1, 0, 1, 2]), [0, 0, 0.5, 1, 1])
  np.testing.assert_allclose(visualisation.to_display([-3, 1.5], scale=3), [0, 0.75])


def test_denoising_grid(tmp_path):
  rng = np.random.default_rng(0)
  clean = np.clip(rng.normal(0, 0.5, (32, 32, 3)), -1, 1)
  sigmas = (0.1, 0.2, 0.4)
  noise = {s: rng.normal(size=clean.shape) for s in sigmas}
  noisy = {s: clean + s * noise[s] for s in sigmas}
  denoised = {s: noisy[s] - s * noise[s] for s in sigmas}
  data = plots.denoising_grid(clean, noisy, noise, denoised, path=tmp_path / 'grid.png')
  assert data[:8] == b'\x89PNG\r\n\x1a\n'
  width, height = assert_png(tmp_path / 'grid.png', 600, 450)
  assert width > height  # 4 columns, 3 rows.
  with pytest.raises(ValueError, match='denoised_by_sigma'):
    plots.denoising_grid(clean, noisy, noise, {0.1: clean})


def _summary(cells):
  """{(method, fraction): mIoUs} as summarize() would return them for one table."""
  return {('demo', 1.0, m, f): tables.Cell(tuple(v)) for (m, f), v in cells.items()}


def test_cell_mean_and_sample_std():
  cell = tables.Cell((0.2, 0.3, 0.4))
  assert cell.n == 3 and cell.mean == pytest.approx(0.3)
  assert cell.std == pytest.approx(0.1)  # ddof=1: sqrt((0.01 + 0 + 0.01) / 2)
  assert '30.00 ± 10.00 (n=3)' == tables.format_cell(cell)


def test_orderings_need_twice_the_larger_std():
  summary = _summary(
      {
          # Lowest fraction: DeP clears none by 6 points > 2 x 2; DDeP by 3 < 2 x 2 (its own std).
          ('none', 0.02): (0.19, 0.20, 0.21),  # std 1 point
          ('dep', 0.02): (0.25, 0.26, 0.27),  # +6, std 1
          ('ddep', 0.02): (0.21, 0.23, 0.25),  # +3, std 2 -> margin 4
          ('supervised', 0.02): (0.30, 0.31, 0.32),  # DDeP is 8 below: reversed
          ('supervised', 1.0): (0.50,),
          ('dep', 1.0): (0.55,),
          ('none', 1.0): (0.40,),
          ('ddep', 1.0): (0.52,),
      }
  )
  rows = {(r['better'], r['worse']): r for r in tables.orderings(summary)}
  assert rows[('dep', 'none')]['verdict'] == 'holds'
  assert rows[('dep', 'none')]['label_fraction'] == 0.02
  assert rows[('dep', 'none')]['difference'] == pytest.approx(0.06)
  assert rows[('dep', 'none')]['margin'] == pytest.approx(0.02)
  assert rows[('ddep', 'none')]['verdict'] == 'within noise'
  assert rows[('ddep', 'supervised')]['verdict'] == 'reversed'
  # All labels: one run each, so no std; the sign is reported as such.
  assert rows[('supervised', 'dep')]['label_fraction'] == 1.0
  assert rows[('supervised', 'dep')]['verdict'] == 'reversed (n=1, no std)'
  table = tables.markdown_orderings(tables.orderings(summary))
  assert (
      '| DeP beats random initialisation with few labels (Fig. 2, Table 1) | 2% | +6.00 | 2.00 | holds |'
      in table
  )
  assert '| – | reversed (n=1, no std) |' in table


def test_orderings_skip_missing_methods():
  summary = _summary({('none', 0.1): (0.2, 0.3), ('dep', 0.1): (0.4, 0.5)})
  rows = tables.orderings(summary)
  assert [(r['better'], r['worse']) for r in rows] == [('dep', 'none')]
  # Only 100%: no claim about few labels; only 10%: none about all labels.
  only_full = _summary({('supervised', 1.0): (0.5,), ('dep', 1.0): (0.4,), ('none', 1.0): (0.3,)})
  assert [(r['better'], r['worse']) for r in tables.orderings(only_full)] == [('supervised', 'dep')]


def test_label_count_runs_are_grouped_by_count_apart_from_fractions(tmp_path):
  """`label_count=20` of a 4,000-image split is 0.5%, a column apart from a 0.5% fraction."""
  rng = np.random.default_rng(1)
  mious = {}
  for method in ('none', 'ddep'):
    for labels in (1.0, 0.005, 20):
      for seed in (0, 1):
        miou = float(rng.uniform(0.1, 0.6))
        mious.setdefault((method, labels), []).append(miou)
        count = labels if isinstance(labels, int) else None
        workdir = tmp_path / f'{method}_{labels}_{seed}'
        workdir.mkdir()
        workdir_lib.write_results(
            workdir,
            method=method,
            dataset='ade20k',
            label_fraction=20 / 4000 if count else labels,
            label_count=count,
            subset_seed=seed,
            decoder_width=1,
            metrics={'miou': miou},
        )
  runs = [records.load_run(w) for w in records.find_workdirs([str(tmp_path / '*')])]
  assert json.loads((runs[0].workdir / workdir_lib.RESULTS_FILE).read_text()).keys() >= {
      'label_count',
      'label_fraction',
  }
  summary = tables.summarize(runs)
  counted = summary[('ade20k', 1, 'ddep', records.LabelCount(20, 0.005))]
  assert sorted(counted.values) == sorted(mious[('ddep', 20)])
  assert sorted(summary[('ade20k', 1, 'ddep', 0.005)].values) == sorted(mious[('ddep', 0.005)])
  assert len(summary) == 6
  header = tables.markdown_summary(summary).splitlines()[2]
  assert header == '| Method | 100% | 0.5% | 20 labels |'
  # The lowest column is the count's (same fraction, the count sorts after it).
  rows = tables.orderings(summary)
  assert [(r['better'], r['worse'], r['labels']) for r in rows] == [('ddep', 'none', '20 labels')]
  assert rows[0]['difference'] == pytest.approx(
      np.mean(mious[('ddep', 20)]) - np.mean(mious[('none', 20)])
  )
  assert '| 20 labels |' in tables.markdown_orderings(rows)
  report.build_report(runs, tmp_path / 'out')
  entries = json.loads((tmp_path / 'out' / 'summary.json').read_text())
  entry = next(e for e in entries if e['method'] == 'ddep' and e['label_count'] == 20)
  assert entry['label_fraction'] == 0.005 and entry['n'] == 2
  assert_png(tmp_path / 'out' / 'miou_vs_fraction_ade20k_1x.png', 400, 300)


def test_results_with_a_bad_label_count_are_refused(tmp_path):
  results = {
      'method': 'dep',
      'dataset': 'ade20k',
      'label_fraction': 0.01,
      'subset_seed': 0,
      'decoder_width': 1,
      'miou': 0.3,
      'label_count': 2.5,
  }
  with pytest.raises(records.ReportError, match=r'label_count 2\.5 is not a count'):
    records.validate_results(results, tmp_path / 'results.json')


def test_pretraining_record_has_the_noise_form_and_level_in_its_own_terms(tmp_path):
  def record(denoise):
    (tmp_path / 'config.json').write_text(json.dumps({'method': 'ddep', 'denoise': denoise}))
    return workdir_lib.pretraining_record(str(tmp_path / 'checkpoints' / '100'))

  ddpm = record(
      {
          'form': 'ddpm',
          'sigma': 0.0,
          'sigma_range': [],
          'gamma': 0.8,
          'gamma_range': [],
          'target': 'eps',
      }
  )
  assert (ddpm['form'], ddpm['gamma'], ddpm['sigma']) == ('ddpm', 0.8, None)
  assert ddpm['sigma_equivalent'] == pytest.approx(0.5)  # sqrt(0.2 / 0.8)
  ranged = record({'form': 'ddpm', 'sigma': 0.0, 'gamma': 0.0, 'gamma_range': [0.5, 0.8]})
  assert ranged['gamma_range'] == [0.5, 0.8]
  assert ranged['sigma_equivalent'] == pytest.approx([0.5, 1.0])  # γ falls as σ grows
  additive = record({'form': 'additive', 'sigma': 0.1, 'sigma_range': [], 'gamma': 0.0})
  assert (additive['sigma'], additive['gamma'], additive['sigma_equivalent']) == (0.1, None, 0.1)
  # Runs from before `gamma` existed read σ as γ under 'ddpm': recorded as what they ran.
  old = record({'form': 'ddpm', 'sigma': 0.25, 'sigma_range': []})
  assert (old['gamma'], old['sigma']) == (0.25, None)
  assert old['sigma_equivalent'] == pytest.approx(3**0.5)


def test_select_best_picks_lr_wd_on_selection_seeds_and_reports_final_seeds(tmp_path, capsys):
  """A 2 x 2 (lr, wd) grid, 4 seeds: 0-1 choose the pair, 2-3 are what is reported."""
  mious = {  # (lr, wd) -> mIoU per seed 0..3
      (1e-5, 1e-4): (0.30, 0.32, 0.20, 0.22),
      (3e-4, 1e-4): (0.40, 0.42, 0.25, 0.27),  # best on seeds 0, 1
      (1e-5, 3e-4): (0.35, 0.35, 0.50, 0.50),  # best on 2, 3 but not chosen by them
      (3e-4, 3e-4): (0.10, 0.12, 0.10, 0.12),
  }
  for (lr, wd), values in mious.items():
    for seed, miou in enumerate(values):
      workdir = tmp_path / 'runs' / f'lr{lr}_wd{wd}_s{seed}'
      workdir.mkdir(parents=True)
      (workdir / 'config.json').write_text(json.dumps({'optim': {'lr': lr, 'weight_decay': wd}}))
      workdir_lib.write_results(
          workdir,
          method='ddep',
          dataset='ade20k',
          label_fraction=0.1,
          subset_seed=seed,
          decoder_width=1,
          metrics={'miou': miou},
      )
  runs = [records.load_run(w) for w in records.find_workdirs([str(tmp_path / 'runs')])]
  chosen = tables.select_best(runs, selection_seeds=[0, 1], final_seeds=[2, 3])
  best = chosen[('ade20k', 1, 'ddep', 0.1)]
  assert (best['lr'], best['weight_decay']) == (3e-4, 1e-4)
  assert best['selection'].values == pytest.approx((0.40, 0.42))
  assert sorted(best['final'].values) == pytest.approx([0.25, 0.27])
  assert len(best['candidates']) == 4
  assert (
      '| ade20k | 1x | DDeP | 10% | 0.0003 | 0.0001 | 41.00 ± 1.41 (n=2) | 26.00 ± 1.41 (n=2) |'
      in tables.markdown_selection(chosen)
  )

  out = tmp_path / 'out'
  assert (
      _report_main(
          [
              f"--workdirs={tmp_path / 'runs'}",
              f'--output={out}',
              '--select=best',
              '--selection_seeds=0,1',
              '--final_seeds=2,3',
          ]
      )
      == 0
  )
  assert '2 runs' in capsys.readouterr().out  # only the chosen pair's final seeds
  assert '| DDeP | 26.00 ± 1.41 (n=2) |' in (out / 'summary.md').read_text()
  assert '0.0003' in (out / 'selection.md').read_text()
  # A run without its config.json cannot be placed in the grid: said, with the path.
  (tmp_path / 'runs' / 'lr1e-05_wd0.0001_s0' / 'config.json').unlink()
  with pytest.raises(records.ReportError, match=r'config\.json: no optim\.lr'):
    tables.select_best(runs)


def _pretraining_run(workdir, *, task='denoise', method='dep', lr=1e-4, rows=()):
  workdir.mkdir(parents=True)
  config = {
      'task': task,
      'method': method,
      'total_steps': 300,
      'total_epochs': 0.0,
      'optim': {'lr': lr},
      'denoise': {'form': 'additive', 'sigma': 0.8, 'sigma_range': []},
  }
  (workdir / 'config.json').write_text(json.dumps(config))
  (workdir / workdir_lib.CURVES_FILE).write_text(''.join(json.dumps(r) + '\n' for r in rows))


def test_pretraining_validation_against_step_per_run(tmp_path, capsys):
  root = tmp_path / 'pretrain'
  _pretraining_run(
      root / 'short',
      rows=[
          {'step': 50, 'train/loss': 0.9},
          {'step': 100, 'val/psnr': 20.0, 'val/eps_mse': 0.3},
          {'step': 200, 'val/psnr': 21.0, 'val/eps_mse': 0.25},
          # A resumed run logged step 200 again: the last attempt's row wins.
          {'step': 200, 'val/psnr': 21.5, 'val/eps_mse': 0.24},
      ],
  )
  _pretraining_run(
      root / 'long', lr=3e-4, rows=[{'step': 100, 'val/psnr': 19.0, 'val/eps_mse': 0.35}]
  )
  _pretraining_run(root / 'finetune', task='segment', rows=[{'step': 100, 'val/miou': 0.3}])
  out = tmp_path / 'out'
  assert _report_main([f'--pretraining={root}', f'--output={out}']) == 0
  assert 'pretraining_validation.png' in capsys.readouterr().out
  data = {
      d['workdir'].rsplit('/', 1)[-1]: d
      for d in json.loads((out / 'pretraining_validation.json').read_text())
  }
  assert sorted(data) == ['long', 'short']  # The fine-tuning run is not a pretraining run.
  assert data['short']['val/psnr'] == [[100, 20.0], [200, 21.5]]
  assert data['short']['val/eps_mse'] == [[100, 0.3], [200, 0.24]]
  assert data['long']['label'] == 'dep σ=0.8 lr=0.0003 300 steps (long)'
  assert Image.open(out / 'pretraining_validation.png').size[0] > 500
  with pytest.raises(records.ReportError, match='no config.json found for --pretraining'):
    records.find_pretraining_runs([str(tmp_path / 'nothing_here')])


def test_the_cli_needs_runs_to_report(tmp_path):
  from absl import app  # pylint: disable=g-import-not-at-top

  with pytest.raises(app.UsageError, match='--workdirs'):
    _report_main([f'--output={tmp_path}'])
