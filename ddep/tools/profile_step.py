r"""Where a compiled train step's time goes: XLA's per-op times, summed by model part.

  python -m ddep.tools.profile_step --preset=r50_vit_b16 --task=classify --image_size=224 \
      --batch_size=2 --dtype=float32 --num_classes=1000 --eval_size=0 --profile_steps=2

Takes `ddep.tools.benchmark`'s flags (one phase: the first of --task), builds and compiles
the same step, runs --warmup steps, then traces --profile_steps steps with jax.profiler.
Each traced op (one event per HLO instruction on XLA:CPU's thunk runtime, one per kernel
on a GPU's) is attributed to a part of the model by the `op_name` metadata of the compiled
HLO: for a fusion, that of its dot or convolution, else of its first instruction that
has any. Parts are the regexes of `PARTS`, first match wins; everything outside
`jvp(...)`/`transpose(...)` is the optimizer (Adam, the logged norms, the finite check).
Kernel gradients of convolutions carry no metadata and are listed as such.

Event times are summed over threads, so on a CPU their total exceeds the wall time
when ops run concurrently; the table gives both. `--output` appends the result as one
JSON line. docs/performance_cpu.md has a profile of the CPU step made this way.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import re
import sys
import tempfile
import time
from typing import Optional, Sequence

from absl import app
from absl import flags

from ddep.runs import process
from ddep.tools import benchmark
from ddep.tools import hlo_roofline

# (part, op_name regex, kinds it applies to or None for any); first match wins.
PARTS = (
    ('optimizer + norms', r'^(?!.*\b(?:jvp|transpose)\()', None),
    ('weight standardization', r'\.param/', None),
    ('GroupNorm', r'/(?:gn\w*|GroupNorm_\d+)/', None),
    ('LayerNorm', r'/(?:LayerNorm_\d+|encoder_norm)/', None),
    ('attention projections', r'MultiHeadDotProductAttention_\d+/(?:query|key|value|out)/', None),
    ('attention core', r'MultiHeadDotProductAttention_\d+/', None),
    ('Transformer MLP', r'/MlpBlock_\d+/', None),
    ('decoder convolutions', r'TransUNet\.decode|/decoder/', ('conv', 'dot')),
    ('decoder, other', r'TransUNet\.decode|/decoder/', None),
    ('ResNet convolutions', r'/encoder/', ('conv', 'dot')),
    ('heads', r'/(?:head|classifier)\b', None),
)
NO_METADATA = 'no metadata'
OTHER = 'other (activations, residuals, pooling, losses)'
# Control flow: their events contain those of their bodies, which are counted instead.
_CONTAINERS = ('while', 'conditional', 'call')

_OP_NAME_RE = re.compile(r'op_name="([^"]*)"')


def instruction_table(hlo_text: str) -> dict[str, dict]:
  """Top-level instruction name -> {'op_name', 'kind', 'opcode'} of a compiled module.

  kind: 'conv' or 'dot' if it is or fuses one, 'copy' for copies and transposes,
  else 'elementwise' (elementwise ops, reductions, slices and the rest).
  """
  comps, _, _ = hlo_roofline.parse_module(hlo_text)
  called = set()
  for instrs in comps.values():
    for instr in instrs:
      if instr.op == 'fusion':
        called.update(hlo_roofline.called_computations(instr))

  def fused(instr):
    """The instructions a fusion runs, those of nested fusions included (HLO calls no cycles)."""
    if instr.op != 'fusion':
      return []
    return [
        inner
        for comp in hlo_roofline.called_computations(instr)
        for i in comps.get(comp, ())
        for inner in (i, *fused(i))
    ]

  table = {}
  for comp, instrs in comps.items():
    if comp in called:
      continue  # A fusion's body: its instructions run inside the fusion's event.
    for instr in instrs:
      body = fused(instr)
      ops = {instr.op} | {i.op for i in body}
      if ops & {'convolution'}:
        kind = 'conv'
      elif ops & {'dot'}:
        kind = 'dot'
      elif instr.op in ('copy', 'transpose') or re.match(r'(?:copy|transpose)', instr.name):
        kind = 'copy'
      else:
        kind = 'elementwise'
      key_ops = [i for i in body if i.op in ('convolution', 'dot')]
      op_name = None
      for candidate in [instr, *key_ops, *body]:
        m = _OP_NAME_RE.search(candidate.attrs)
        if m:
          op_name = m.group(1)
          break
      table[instr.name] = {'op_name': op_name, 'kind': kind, 'opcode': instr.op}
  return table


def part_of(op_name: Optional[str], kind: str) -> str:
  if not op_name:
    return NO_METADATA
  for part, pattern, kinds in PARTS:
    if (kinds is None or kind in kinds) and re.search(pattern, op_name):
      return part
  return OTHER


def op_seconds(trace_dir: str, names) -> dict[str, float]:
  """Instruction name -> seconds summed over the trace's events (all threads)."""
  import jax  # pylint: disable=g-import-not-at-top

  files = glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'), recursive=True)
  if not files:
    raise FileNotFoundError(f'no *.xplane.pb under {trace_dir}: did the trace run?')
  data = jax.profiler.ProfileData.from_file(max(files, key=os.path.getmtime))
  totals = collections.defaultdict(float)
  for plane in data.planes:
    for line in plane.lines:
      for event in line.events:
        if event.name in names:
          totals[event.name] += event.duration_ns * 1e-9
  return dict(totals)


def summarize(table: dict[str, dict], seconds: dict[str, float], steps: int) -> dict:
  """Per-part, per-kind and per-op seconds per step, largest first."""
  by_part, by_kind = collections.defaultdict(float), collections.defaultdict(float)
  ops = []
  for name, s in seconds.items():
    info = table[name]
    if info['opcode'] in _CONTAINERS:
      continue
    part = part_of(info['op_name'], info['kind'])
    by_part[part] += s / steps
    by_kind[info['kind']] += s / steps
    ops.append({'name': name, 'seconds': s / steps, 'part': part, **info})
  total = sum(by_part.values())

  def ranked(d):
    return [
        {'name': k, 'seconds': v, 'share': v / total if total else 0.0}
        for k, v in sorted(d.items(), key=lambda kv: -kv[1])
    ]

  return {
      'op_seconds_per_step': total,
      'parts': ranked(by_part),
      'kinds': ranked(by_kind),
      'top_ops': sorted(ops, key=lambda o: -o['seconds']),
  }


def format_summary(result: dict, top: int = 10) -> str:
  lines = [
      f"{result['phase']} step, {result['device']}: wall {result['wall_s_per_step']:.3f} s "
      f"per step during the trace, op time {result['op_seconds_per_step']:.3f} s "
      f"(summed over threads), {result['profile_steps']} steps traced",
      '',
      '| part | s per step | share |',
      '|---|---:|---:|',
  ]
  lines += [f"| {p['name']} | {p['seconds']:.3f} | {p['share']:.1%} |" for p in result['parts']]
  lines += ['', '| kind | s per step | share |', '|---|---:|---:|']
  lines += [f"| {k['name']} | {k['seconds']:.3f} | {k['share']:.1%} |" for k in result['kinds']]
  lines += ['', f'Largest {top} ops:']
  for op in result['top_ops'][:top]:
    where = (op['op_name'] or '-').replace('jit(train_step)/', '')
    lines.append(f"  {op['seconds'] * 1e3:8.1f} ms  {op['kind']:11s} {op['name']}  {where[:110]}")
  return '\n'.join(lines)


def profile(args, *, profile_steps: int, trace_dir: Optional[str] = None) -> dict:
  """Builds, compiles, warms up and traces the step of `args`' first task."""
  import jax  # pylint: disable=g-import-not-at-top

  phase = benchmark.phases_of(args)[0]
  program = benchmark.build_phase(args, phase)
  compiled, _, _, _ = benchmark.compile_program(program)
  table = instruction_table(compiled.as_text())
  run_once, block, _ = benchmark.make_runner(program, compiled)
  benchmark.time_steps(run_once, warmup=max(1, args.warmup), steps=0, trials=0, block=block)
  trace_dir = trace_dir or tempfile.mkdtemp(prefix='ddep_profile_')
  with jax.profiler.trace(trace_dir):
    t0 = time.perf_counter()
    for _ in range(profile_steps):
      run_once()
    block()
    wall = (time.perf_counter() - t0) / profile_steps
  result = summarize(table, op_seconds(trace_dir, table), profile_steps)
  device = program.mesh.devices.flat[0]
  return {
      'phase': phase,
      'device': device.device_kind,
      'preset': args.preset,
      'batch_size': program.batch_size,
      'image_size': list(program.hw),
      'dtype': args.dtype,
      'profile_steps': profile_steps,
      'wall_s_per_step': wall,
      'trace_dir': trace_dir,
      **result,
  }


def define_flags(flag_values: flags.FlagValues, sys_argv: Optional[Sequence[str]] = None) -> None:
  benchmark.define_flags(flag_values, sys_argv=sys_argv)
  fv = {'flag_values': flag_values}
  flags.DEFINE_integer('profile_steps', 2, 'Steps traced (after --warmup).', **fv)
  flags.DEFINE_string('trace_dir', '', 'Where the trace goes (default: a temporary folder).', **fv)
  flags.DEFINE_integer('top', 10, 'Largest ops listed.', **fv)


def run(flag_values: flags.FlagValues) -> dict:
  """Profiles the step that parsed `flag_values` describe; prints the table."""
  args = benchmark.args_from_flags(flag_values)
  if args.compile_only or flag_values.profile_steps < 1:
    raise app.UsageError(
        'profile_step runs the step: no --compile_only/--target; --profile_steps >= 1'
    )
  result = profile(
      args, profile_steps=flag_values.profile_steps, trace_dir=flag_values.trace_dir or None
  )
  print(format_summary(result, top=flag_values.top), flush=True)
  if args.output:
    row = dict(result, top_ops=result['top_ops'][: flag_values.top])
    with open(args.output, 'a') as f:
      f.write(json.dumps(row) + '\n')
  return result


def main(argv: Sequence[str]) -> dict:
  """The tool in-process: `argv` without the program name, parsed into fresh flags."""
  return run(benchmark.parse_fresh_flags('ddep.tools.profile_step', argv, define_flags))


def _app_main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  process.configure_gc()
  run(flags.FLAGS)


if __name__ == '__main__':
  define_flags(flags.FLAGS)
  app.run(_app_main)
