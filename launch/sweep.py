r"""Expands a table or figure of the paper into runs, one workdir each, and launches them.

  python launch/sweep.py table1 --workdir_root=/shared/ddep --dry_run
  python launch/sweep.py table3 --workdir_root=gs://B/ddep --launcher=tpu \
      --tpu_name=ddep-v4 --zone=us-central2-b --stage=pretrain
  python launch/sweep.py table1 --workdir_root=/shared/ddep --launcher=slurm \
      --methods=ddep --fractions=1/30 --seeds=1 --lrs=1e-5,3e-5,1e-4,3e-4 --wds=1e-5,1e-4,3e-4

A grid is rows (method, decoder width, model, pretraining variant) x label
fractions x seeds (x lr x wd). Runs that need a pretraining (DeP, DDeP) get
`init_from=` its workdir; pretraining runs come first. Workdirs:

  ROOT/pretrain/<dataset>/<method>_w<width>[_<model>][_<variant>]
  ROOT/finetune/<dataset>/<method>_w<width>[_<model>][_<variant>]/f<fraction>_s<seed>[_lr.._wd..]

Launchers: 'local' runs `python -m ddep.main` one after another; 'tpu' runs each
on all workers of one TPU VM through launch/tpu.sh, in order; 'slurm' submits
launch/slurm.sbatch jobs, fine-tuning jobs depending (afterok) on their
pretraining job. --dry_run prints the commands (for slurm, a bash script) instead.
Flags after `--` are passed to every `ddep.main` run, e.g. `-- --config.seed=5`.
`python -m ddep.report --workdirs=ROOT/finetune/<dataset>/<row>/*` then gathers a row.
"""

from __future__ import annotations

import dataclasses
import fractions
import shlex
import subprocess
import sys
from typing import Sequence

from absl import app
from absl import flags

DATASETS = ('cityscapes', 'pascal_context', 'ade20k')
PRETRAIN_CONFIG = {d: f'configs/pretrain_{d}.py' for d in DATASETS}
FINETUNE_CONFIG = {d: f'configs/finetune_{d}.py' for d in DATASETS}

# Sec. 4.3: runs averaged per label fraction (different subsets per run). Fractions
# the paper does not list (e.g. Figure 2's 1% and 2%) get 10, as its small ones do.
PAPER_SEEDS = {
    'cityscapes': {'1': 10, '1/4': 4, '1/8': 6, '1/30': 10},
    'pascal_context': {'1': 10, '0.2': 5, '0.1': 10, '0.05': 10, '0.01': 10},
    'ade20k': {'1': 10, '0.2': 5, '0.1': 10, '0.05': 10, '0.01': 10},
}
DEFAULT_SEEDS = 10

CITYSCAPES_FRACTIONS = ('1', '1/4', '1/8', '1/30')  # Table 1
PC_ADE_FRACTIONS = ('1', '0.2', '0.1', '0.05', '0.01')  # Tables 3-5
# Figure 7's sigmas and Figure 8's epochs/lrs are not given in the text; these
# grids bracket the paper's defaults (sigma 0.1 / 0.8, 6000 epochs at lr 1e-4).
FIG7_SIGMAS = ('0.05', '0.1', '0.2', '0.3', '0.4', '0.6', '0.8')
FIG8_EPOCHS = ('100', '300', '1000', '3000', '6000')
FIG8_LRS = ('3e-5', '1e-4', '3e-4', '1e-3')


@dataclasses.dataclass(frozen=True)
class Row:
  """One line of a table: a method at a decoder width, with its pretraining variant."""

  method: str
  width: int = 1
  model: str = 'r50_vit_b16'
  pretrain_args: tuple[tuple[str, str], ...] = ()  # e.g. (('sigma', '0.2'),)

  @property
  def name(self) -> str:
    parts = [f'{self.method}_w{self.width}']
    if self.model != 'r50_vit_b16':
      parts.append(self.model)
    parts += [f'{k}{v.replace(":", "-")}' for k, v in self.pretrain_args]
    return '_'.join(parts)

  @property
  def needs_pretraining(self) -> bool:
    return self.method in ('dep', 'ddep')


@dataclasses.dataclass(frozen=True)
class Grid:
  datasets: tuple[str, ...]
  rows: tuple[Row, ...]
  fractions: tuple[str, ...]


def _rows(methods: Sequence[str], widths: Sequence[int], **kw) -> tuple[Row, ...]:
  return tuple(Row(m, w, **kw) for w in widths for m in methods)


_BASELINES_AND_DDEP = ('none', 'supervised', 'ddep')
GRIDS = {
    # Table 1: Cityscapes, every method at 1x; DeP has no 2x row.
    'table1': Grid(
        ('cityscapes',),
        _rows(('none', 'supervised', 'dep', 'ddep'), (1,)) + _rows(_BASELINES_AND_DDEP, (2,)),
        CITYSCAPES_FRACTIONS,
    ),
    # Table 2: our row is Table 1's DDeP 2x (the baselines are other papers').
    'table2': Grid(('cityscapes',), (Row('ddep', 2),), CITYSCAPES_FRACTIONS),
    # Figure 2: Cityscapes, 1x, down to 1% and 2% labels (Sec. 4.4).
    'fig2': Grid(
        ('cityscapes',),
        _rows(('none', 'supervised', 'dep', 'ddep'), (1,)),
        ('1', '1/4', '1/8', '1/30', '0.02', '0.01'),
    ),
    'table3': Grid(('pascal_context',), _rows(_BASELINES_AND_DDEP, (1, 3)), PC_ADE_FRACTIONS),
    'fig5': Grid(('pascal_context',), _rows(_BASELINES_AND_DDEP, (1,)), PC_ADE_FRACTIONS),
    'table4': Grid(('ade20k',), _rows(_BASELINES_AND_DDEP, (1, 3)), PC_ADE_FRACTIONS),
    'fig6': Grid(('ade20k',), _rows(_BASELINES_AND_DDEP, (1,)), PC_ADE_FRACTIONS),
    # Table 5: the plain ResNet-50 UNet on Pascal Context, on BiT's ResNet-50 v2 so that the
    # supervised and DDeP rows start from the published BiT-M-R50x1 weights.
    'table5': Grid(
        ('pascal_context',),
        _rows(_BASELINES_AND_DDEP, (1,), model='bit_r50_unet'),
        PC_ADE_FRACTIONS,
    ),
    # Table 6: DDeP 3x, sigma ~ U(0.2, 0.3) against sigma = 0.2.
    'table6': Grid(
        ('pascal_context',),
        (
            Row('ddep', 3, pretrain_args=(('sigma_range', '0.2:0.3'),)),
            Row('ddep', 3, pretrain_args=(('sigma', '0.2'),)),
        ),
        ('1', '0.2', '0.1'),
    ),
    # Table 7: predict x against predict eps (Eq. 4), DDeP 1x, all labels.
    'table7': Grid(
        ('pascal_context', 'ade20k'),
        tuple(Row('ddep', 1, pretrain_args=(('target', t),)) for t in ('x', 'eps')),
        ('1',),
    ),
    # Figure 7: DDeP's pretraining sigma.
    'fig7': Grid(
        ('pascal_context', 'ade20k'),
        tuple(Row('ddep', 1, pretrain_args=(('sigma', s),)) for s in FIG7_SIGMAS),
        ('1',),
    ),
    # Figure 8: pretraining length x learning rate (Sec. 4.5.3).
    'fig8': Grid(
        ('pascal_context',),
        tuple(
            Row('ddep', 1, pretrain_args=(('epochs', e), ('lr', lr)))
            for e in FIG8_EPOCHS
            for lr in FIG8_LRS
        ),
        ('1',),
    ),
}


@dataclasses.dataclass(frozen=True)
class Run:
  config: str  # configs/<file>.py
  arg: str  # its get_config argument
  workdir: str
  name: str  # the workdir below the sweep's root, e.g. 'pretrain/ade20k/ddep_w1'
  after: str = ''  # workdir of the run this one initialises from

  @property
  def config_flag(self) -> str:
    return f'--config={self.config}:{self.arg}' if self.arg else f'--config={self.config}'


def _arg(pairs) -> str:
  return ','.join(f'{k}={v}' for k, v in pairs)


def fraction_dir(fraction: str) -> str:
  return 'f' + fraction.replace('/', 'of')


def seeds_for(dataset: str, fraction: str, seeds: str) -> range:
  if seeds != 'paper':
    return range(int(seeds))
  by_value = {fractions.Fraction(k): v for k, v in PAPER_SEEDS[dataset].items()}
  return range(by_value.get(fractions.Fraction(fraction), DEFAULT_SEEDS))


def expand(
    grid: Grid,
    root: str,
    *,
    seeds: str = 'paper',
    methods: Sequence[str] = (),
    widths: Sequence[int] = (),
    fractions_: Sequence[str] = (),
    lrs: Sequence[str] = (),
    wds: Sequence[str] = (),
    encoder: str = '',
    stage: str = 'all',
) -> list[Run]:
  """Pretraining runs (deduplicated, first) and then fine-tuning runs of `grid`."""
  root = root.rstrip('/')
  rows = [
      r
      for r in grid.rows
      if (not methods or r.method in methods) and (not widths or r.width in widths)
  ]
  extra = (('encoder', encoder),) if encoder else ()
  pretrain, finetune = {}, []
  for dataset in grid.datasets:
    for row in rows:
      base = (('method', row.method), ('width', row.width))
      if row.model != 'r50_vit_b16':
        base += (('model', row.model),)
      init = ''
      if row.needs_pretraining:
        rel = f'pretrain/{dataset}/{row.name}'
        init = f'{root}/{rel}'
        pretrain.setdefault(
            init, Run(PRETRAIN_CONFIG[dataset], _arg(base + row.pretrain_args + extra), init, rel)
        )
      for fraction in fractions_ or grid.fractions:
        for seed in seeds_for(dataset, fraction, seeds):
          for lr in lrs or ('',):
            for wd in wds or ('',):
              hp = (('lr', lr),) if lr else ()
              hp += (('wd', wd),) if wd else ()
              run = f'{fraction_dir(fraction)}_s{seed}' + ''.join(f'_{k}{v}' for k, v in hp)
              rel = f'finetune/{dataset}/{row.name}/{run}'
              pairs = base + (('fraction', fraction), ('seed', seed)) + hp
              pairs += (('init_from', init),) if init else extra
              finetune.append(
                  Run(FINETUNE_CONFIG[dataset], _arg(pairs), f'{root}/{rel}', rel, after=init)
              )
  return {
      'pretrain': list(pretrain.values()),
      'finetune': finetune,
      'all': list(pretrain.values()) + finetune,
  }[stage]


def _quote(args: Sequence[str]) -> str:
  return ' '.join(shlex.quote(a) for a in args)


def commands(
    runs: Sequence[Run],
    *,
    launcher: str,
    python: str = 'python',
    tpu_name: str = '',
    zone: str = '',
    extra_flags: Sequence[str] = (),
) -> list[str]:
  """One shell line per run, in launch order."""
  lines, job_vars = [], {}
  for i, run in enumerate(runs):  # i: a unique shell variable for a slurm job id
    run_flags = [run.config_flag, f'--workdir={run.workdir}', *extra_flags]
    if launcher == 'local':
      lines.append(_quote([python, '-m', 'ddep.main', *run_flags]))
    elif launcher == 'tpu':
      lines.append(
          _quote(['launch/tpu.sh', 'run', f'--name={tpu_name}', f'--zone={zone}', *run_flags])
      )
    elif launcher == 'slurm':
      sbatch = ['sbatch', '--parsable', f'--job-name=ddep.{run.name.replace("/", ".")}']
      dependency = ''
      if run.after in job_vars:  # submitted in this sweep: wait for it to succeed
        dependency = f' --dependency=afterok:${job_vars[run.after]}'
      line = _quote(sbatch) + dependency + ' ' + _quote(['launch/slurm.sbatch', *run_flags])
      if any(r.after == run.workdir for r in runs):
        job_vars[run.workdir] = f'JOB{i}'
        line = f'JOB{i}=$({line})'
      lines.append(line)
    else:
      raise ValueError(f'unknown launcher {launcher!r}')
  return lines


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command's flags; the grid (table1 ... fig8) is the one positional argument."""
  fv = {'flag_values': flag_values}
  flags.DEFINE_string('workdir_root', None, "Where the runs' workdirs go (a path or gs://).", **fv)
  flags.DEFINE_enum('stage', 'all', ['all', 'pretrain', 'finetune'], 'Which runs to launch.', **fv)
  flags.DEFINE_enum('launcher', 'local', ['local', 'tpu', 'slurm'], 'How runs are launched.', **fv)
  flags.DEFINE_string('seeds', 'paper', "'paper' (Sec. 4.3) or a number of seeds.", **fv)
  flags.DEFINE_list('methods', [], "Comma-separated subset of the grid's methods.", **fv)
  flags.DEFINE_list('widths', [], 'Comma-separated decoder widths.', **fv)
  flags.DEFINE_list('fractions', [], "Comma-separated label fractions, e.g. '1,1/30'.", **fv)
  flags.DEFINE_list('lrs', [], 'Fine-tuning learning rates (Sec. 4.3 sweep).', **fv)
  flags.DEFINE_list('wds', [], 'Fine-tuning weight decays (Sec. 4.3 sweep).', **fv)
  flags.DEFINE_string('encoder', '', 'ImageNet-21k encoder file for every run.', **fv)
  flags.DEFINE_string('tpu_name', '', 'The TPU VM (--launcher=tpu).', **fv)
  flags.DEFINE_string('zone', '', "The TPU VM's zone (--launcher=tpu).", **fv)
  flags.DEFINE_string('python', sys.executable, "The local launcher's interpreter.", **fv)
  flags.DEFINE_bool('dry_run', False, 'Print the commands only.', **fv)
  flags.mark_flag_as_required('workdir_root', **fv)
  flags.register_multi_flags_validator(
      ['launcher', 'tpu_name', 'zone'],
      lambda f: f['launcher'] != 'tpu' or bool(f['tpu_name'] and f['zone']),
      '--launcher=tpu needs --tpu_name and --zone',
      **fv,
  )


def split_passthrough(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """(the sweep's own argv, the flags after the first `--` for every ddep.main).

  Split before absl parses: absl drops the `--` and would mix those flags into the
  positional arguments.
  """
  argv = list(argv)
  if '--' not in argv:
    return argv, []
  i = argv.index('--')
  return argv[:i], argv[i + 1 :]


def main(
    argv: Sequence[str],
    flag_values: flags.FlagValues = flags.FLAGS,
    *,
    extra_flags: Sequence[str] = (),
) -> int:
  """app.run's main: argv = [program, grid]; `flag_values` are parsed already."""
  if len(argv) != 2 or argv[1] not in GRIDS:
    raise app.UsageError(f'give one grid of {", ".join(sorted(GRIDS))}; got {argv[1:]}')
  a = flag_values
  runs = expand(
      GRIDS[argv[1]],
      a.workdir_root,
      seeds=a.seeds,
      methods=a.methods,
      widths=[int(w) for w in a.widths],
      fractions_=a.fractions,
      lrs=a.lrs,
      wds=a.wds,
      encoder=a.encoder,
      stage=a.stage,
  )
  lines = commands(
      runs,
      launcher=a.launcher,
      python=a.python,
      tpu_name=a.tpu_name,
      zone=a.zone,
      extra_flags=extra_flags,
  )
  if a.dry_run:
    print('\n'.join(lines))
    return 0
  if a.launcher == 'slurm':  # job ids flow from line to line: run them as one script
    script = '\n'.join(lines)
    return subprocess.run(['bash', '-euo', 'pipefail', '-c', script], check=False).returncode
  for line in lines:  # in order, so a pretraining finishes before its fine-tuning starts
    print(f'+ {line}', flush=True)
    subprocess.run(line, shell=True, check=True)
  return 0


if __name__ == '__main__':
  define_flags()
  own_argv, passthrough = split_passthrough(sys.argv)
  app.run(lambda argv: main(argv, extra_flags=passthrough), argv=own_argv)
