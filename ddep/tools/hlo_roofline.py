r"""Roofline lower bound of a compiled step, kernel by kernel, from its optimized HLO.

  python -m ddep.tools.hlo_roofline FILE... [--peak_tflops=989] [--hbm_tbps=3.35] \
      [--model_flops=27.08e12]

FILE: optimized HLO text, one report per file.

Why: a step compiled ahead of time for a GPU we do not have (deviceless XLA:GPU)
still tells us which kernels it launches. Each kernel takes at least
max(flops / peak_flops, bytes / hbm_bytes_per_s), so their sum bounds the step
time from below and says whether the gap to peak is math or memory traffic.

What is counted, per top-level instruction of ENTRY (and of while bodies, times
their known trip count):
- bytes: its operands plus its result(s), read and written once from HBM (an
  estimate: caches and in-place updates are ignored; of a fusion operand that the
  fusion only slices, the slices);
- flops: cuDNN convolutions (2 * MACs of the forward conv, the backward ones
  through the forward shapes), dots inside gemm fusions (Triton or cuDNN) and
  cuBLAS calls, cuDNN flash attention (forward: QK^T and PV, 4*B*N*T*S*H;
  backward: 2.5x forward, its five matmuls S, dP, dV, dQ, dK against two);
  every other fusion is taken as memory-bound (0 flops).
Launch latency, overlap between kernels and imperfect tiling are not modelled,
so the real step is slower than this bound.

Pure Python (no jax; absl for the command line), so it runs anywhere the HLO text is.
"""

import collections
import math
import re

from absl import app
from absl import flags

DTYPE_BYTES = {
    'pred': 1,
    's2': 0.25,
    'u2': 0.25,
    's4': 0.5,
    'u4': 0.5,
    's8': 1,
    'u8': 1,
    's16': 2,
    'u16': 2,
    's32': 4,
    'u32': 4,
    's64': 8,
    'u64': 8,
    'f16': 2,
    'bf16': 2,
    'f32': 4,
    'f64': 8,
    'c64': 8,
    'c128': 16,
    'f4e2m1fn': 0.5,
    'f8e4m3fn': 1,
    'f8e5m2': 1,
    'f8e4m3': 1,
    'f8e3m4': 1,
    'f8e4m3fnuz': 1,
    'f8e5m2fnuz': 1,
    'f8e4m3b11fnuz': 1,
    'f8e8m0fnu': 1,
    'token': 0,
}
# Instructions that launch no work of their own.
BOOKKEEPING = frozenset(
    (
        'parameter',
        'get-tuple-element',
        'tuple',
        'bitcast',
        'constant',
        'after-all',
        'add-dependency',
        'opt-barrier',
        'partition-id',
        'replica-id',
        'domain',
        'iota-placeholder',
    )
)
CATEGORIES = (
    'conv',
    'gemm',
    'attention',
    'elementwise/reduction fusions',
    'copy/transpose',
    'other',
)
# Ops a fusion may hold and still only move data.
_MOVE_OPS = frozenset(
    ('parameter', 'transpose', 'copy', 'bitcast', 'reshape', 'tuple', 'get-tuple-element')
)
FMHA_BACKWARD_FACTOR = 2.5

_SHAPE_RE = re.compile(r'\b([a-z][a-z0-9]*)\[([^\]]*)\]')
_INSTR_RE = re.compile(r'^\s+(?:ROOT\s+)?%?([^\s=]+)\s*=\s*(.*)$')
_OP_RE = re.compile(r'\s*([A-Za-z][\w$.\-]*)\(')
_CALLED_RE = re.compile(
    r'\b(?:calls|to_apply|body|condition|branch_computations|called_computations)='
    r'(\{[^}]*\}|%?[\w.\-]+)'
)


class _Instr:
  """One parsed HLO instruction."""

  __slots__ = ('name', 'type', 'op', 'operands', 'attrs')

  def __init__(self, name, type_, op, operands, attrs):
    self.name, self.type, self.op, self.operands, self.attrs = (name, type_, op, operands, attrs)


def _closing(s, i):
  """Index of the bracket closing s[i] ('(' or '{'), or -1."""
  pairs = {'(': ')', '{': '}', '[': ']'}
  stack = []
  for j in range(i, len(s)):
    c = s[j]
    if c in pairs:
      stack.append(pairs[c])
    elif stack and c == stack[-1]:
      stack.pop()
      if not stack:
        return j
  return -1


def _split_top(s):
  """Splits s at the commas outside brackets."""
  parts, depth, start = [], 0, 0
  for j, c in enumerate(s):
    if c in '([{':
      depth += 1
    elif c in ')]}':
      depth -= 1
    elif c == ',' and depth == 0:
      parts.append(s[start:j])
      start = j + 1
  parts.append(s[start:])
  return [p.strip() for p in parts if p.strip()]


def _parse_instr(line):
  """Parses one instruction line; None if it is not one."""
  m = _INSTR_RE.match(line)
  if not m:
    return None
  name, rest = m.group(1).lstrip('%'), m.group(2)
  if '/*' in rest:
    rest = re.sub(r'/\*.*?\*/', '', rest)
  if rest.startswith('('):
    end = _closing(rest, 0)
    if end < 0:
      return None
    type_, rest = rest[: end + 1], rest[end + 1 :]
  else:
    sp = rest.find(' ')
    if sp < 0:
      return None
    type_, rest = rest[:sp], rest[sp:]
  m = _OP_RE.match(rest)
  if not m:
    return None
  op = m.group(1)
  start = m.end() - 1
  end = _closing(rest, start)
  if end < 0:
    return None
  operands = [p.split()[-1].lstrip('%') for p in _split_top(rest[start + 1 : end])]
  return _Instr(name, type_, op, operands, rest[end + 1 :])


def parse_module(text):
  """HLO text -> ({computation: [instructions]}, entry name, unparsed lines)."""
  comps, entry, current, skipped = {}, None, None, 0
  for line in text.splitlines():
    if not line.strip() or line.lstrip().startswith('//'):
      continue
    if not line[0].isspace():
      if line.rstrip() == '}':
        current = None
      elif line.rstrip().endswith('{') and not line.startswith('HloModule'):
        head = line.split()
        is_entry = head[0] == 'ENTRY'
        name = head[1 if is_entry else 0].split('(')[0].lstrip('%')
        current = comps.setdefault(name, [])
        if is_entry:
          entry = name
      continue
    if current is None:
      continue
    instr = _parse_instr(line)
    if instr is None:
      skipped += 1
    else:
      current.append(instr)
  return comps, entry, skipped


def _arrays(type_):
  """[(dtype, dims)] of the arrays in an HLO type (a tuple gives several)."""
  out = []
  for dt, dims in _SHAPE_RE.findall(type_):
    if dt not in DTYPE_BYTES:
      continue
    out.append((dt, [int(d.lstrip('<=')) for d in dims.split(',') if d.strip()]))
  return out


def type_bytes(type_):
  """Bytes of an HLO type, tuples summed over their elements."""
  return int(sum(DTYPE_BYTES[dt] * math.prod(dims) for dt, dims in _arrays(type_)))


def _dims(type_):
  """Dims of the first array of a type ([] if none)."""
  arrays = _arrays(type_)
  return arrays[0][1] if arrays else []


def _ints(s):
  return [int(v) for v in re.findall(r'\d+', s)]


def called_computations(instr):
  """The computations `instr` calls: fusion bodies, loop bodies and conditions, reducers."""
  names = []
  for group in _CALLED_RE.findall(instr.attrs):
    names += [n.lstrip('%') for n in re.findall(r'%?([\w.\-]+)', group)]
  return names


def _conv_flops(instr, shapes):
  """2 * MACs of the forward conv a (cuDNN or HLO) convolution computes."""
  dl = re.search(r'dim_labels=(\w+)_(\w+)->(\w+)', instr.attrs)
  if not dl or not instr.operands:
    return 0
  out, a0 = _dims(instr.type), _dims(shapes.get(instr.operands[0], ''))
  target = re.search(r'custom_call_target="([^"]+)"', instr.attrs)
  target = target.group(1) if target else ''
  if 'BackwardInput' in target:  # dy -> dx: the forward input is our result.
    fwd_in, fwd_out = out, a0
  elif 'BackwardFilter' in target:  # (x, dy) -> dw.
    fwd_in = a0
    fwd_out = _dims(shapes.get(instr.operands[1], '')) if len(instr.operands) > 1 else []
  else:
    fwd_in, fwd_out = a0, out
  lhs = dl.group(1)
  if not fwd_out or 'f' not in lhs or len(fwd_in) != len(lhs):
    return 0
  win = re.search(r'window=\{size=([\dx]+)', instr.attrs)
  k = math.prod(int(v) for v in win.group(1).split('x')) if win else 1
  fg = re.search(r'feature_group_count=(\d+)', instr.attrs)
  groups = int(fg.group(1)) if fg else 1
  return 2 * math.prod(fwd_out) * k * fwd_in[lhs.index('f')] // groups


def _dot_flops(instr, shapes):
  """2 * prod(result dims) * prod(contracting dims) of an HLO dot."""
  lhs = _dims(shapes.get(instr.operands[0], '')) if instr.operands else []
  m = re.search(r'lhs_contracting_dims=\{([\d,\s]*)\}', instr.attrs)
  if not lhs or not m:
    return 0
  contracted = math.prod(lhs[d] for d in _ints(m.group(1)) if d < len(lhs))
  return 2 * math.prod(_dims(instr.type)) * contracted


def _fmha_flops(instr, shapes, target):
  """cuDNN attention: 4*B*N*T*S*H forward, FMHA_BACKWARD_FACTOR x that backward."""
  if len(instr.operands) < 2:
    return 0
  q = _dims(shapes.get(instr.operands[0], ''))
  k = _dims(shapes.get(instr.operands[1], ''))
  if not q or not k:  # Fall back on the declared operand layouts.
    lc = re.search(r'operand_layout_constraints=\{(.*?)\}\s*,\s*\w+=', instr.attrs)
    arrays = _arrays(lc.group(1)) if lc else []
    if len(arrays) < 2:
      return 0
    q, k = arrays[0][1], arrays[1][1]
  dn = re.search(r'"bmm1_dot_dimension_numbers":\s*\{([^}]*)\}', instr.attrs)
  if dn:
    fields = dict(re.findall(r'"(\w+)":\s*\[([^\]]*)\]', dn.group(1)))
    qc, qb = _ints(fields.get('lhs_contracting_dimensions', '')), _ints(
        fields.get('lhs_batch_dimensions', '')
    )
    kc, kb = _ints(fields.get('rhs_contracting_dimensions', '')), _ints(
        fields.get('rhs_batch_dimensions', '')
    )
  else:  # The default [B, T, N, H] layout.
    qc, qb, kc, kb = [3], [0, 2], [3], [0, 2]
  if max(qc + qb, default=0) >= len(q) or max(kc + kb, default=0) >= len(k):
    return 0
  bn = math.prod(q[d] for d in qb)
  h = math.prod(q[d] for d in qc)
  t = math.prod(q[d] for d in range(len(q)) if d not in qb + qc)
  s = math.prod(k[d] for d in range(len(k)) if d not in kb + kc)
  fwd = 4 * bn * t * s * h
  return int(fwd * FMHA_BACKWARD_FACTOR) if 'Backward' in target else fwd


class _Analyzer:
  """Walks the kernels of a module and accumulates their roofline."""

  def __init__(self, comps, peak_flops, hbm_bytes_per_s):
    self.comps, self.peak, self.bw = comps, peak_flops, hbm_bytes_per_s
    self.shapes = {i.name: i.type for instrs in comps.values() for i in instrs}
    self._inner = {}
    self.notes = []

  def inner(self, comp, _seen=()):
    """(dot flops, conv flops, moves only) of a fused computation and its callees."""
    if comp in self._inner:
      return self._inner[comp]
    dot = conv = 0
    moves = True
    for instr in self.comps.get(comp, ()):
      if instr.op == 'dot':
        dot += _dot_flops(instr, self.shapes)
      elif instr.op == 'convolution':
        conv += _conv_flops(instr, self.shapes)
      elif instr.op not in _MOVE_OPS and instr.op != 'fusion':
        moves = False
      for callee in called_computations(instr):
        if callee not in _seen and callee != comp:
          d, c, m = self.inner(callee, _seen + (comp,))
          dot, conv, moves = dot + d, conv + c, moves and m
    self._inner[comp] = (dot, conv, moves)
    return self._inner[comp]

  def classify(self, instr):
    """(category, flops) of one kernel."""
    op = instr.op
    if op == 'custom-call':
      m = re.search(r'custom_call_target="([^"]+)"', instr.attrs)
      target = m.group(1) if m else ''
      if target.startswith('__cudnn$conv'):
        return 'conv', _conv_flops(instr, self.shapes)
      if 'fmha' in target.lower():
        return 'attention', _fmha_flops(instr, self.shapes, target)
      if target.startswith('__cublas'):
        dn = re.search(r'"lhs_contracting_dimensions":\s*\[([^\]]*)\]', instr.attrs)
        lhs = _dims(self.shapes.get(instr.operands[0], '')) if instr.operands else []
        if dn and lhs:
          contracted = math.prod(lhs[d] for d in _ints(dn.group(1)) if d < len(lhs))
          return 'gemm', 2 * math.prod(_dims(instr.type)) * contracted
        return 'gemm', 0
      return 'other', 0
    if op == 'fusion':
      dot = conv = 0
      moves = True
      for callee in called_computations(instr):
        d, c, m = self.inner(callee)
        dot, conv, moves = dot + d, conv + c, moves and m
      if conv:
        return 'conv', conv + dot
      if dot:
        return 'gemm', dot
      return ('copy/transpose' if moves else 'elementwise/reduction fusions'), 0
    if op == 'dot':
      return 'gemm', _dot_flops(instr, self.shapes)
    if op == 'convolution':
      return 'conv', _conv_flops(instr, self.shapes)
    if op in ('copy', 'copy-start', 'transpose'):
      return 'copy/transpose', 0
    return 'other', 0

  def operand_bytes(self, instr):
    """Bytes the kernel reads: each operand once, or, for a fusion operand that its body
    only slices, what the slices cover (XLA:GPU splits a fused QKV matmul's output into
    q, k and v by three fusions that each read their third of it)."""
    sliced = {}
    if instr.op == 'fusion':
      for callee in called_computations(instr):
        sliced.update(self.sliced_parameters(callee))
    return sum(
        sliced.get(i, type_bytes(self.shapes.get(o, ''))) for i, o in enumerate(instr.operands)
    )

  def sliced_parameters(self, comp):
    """{parameter number: bytes of its slices} for the parameters of a fused computation
    whose only users are slices."""
    instrs = self.comps.get(comp, ())
    users = collections.defaultdict(list)
    for i in instrs:
      for o in i.operands:
        users[o].append(i)
    out = {}
    for i in instrs:
      if i.op != 'parameter' or not i.operands or not users[i.name]:
        continue
      if all(u.op == 'slice' for u in users[i.name]):
        out[int(i.operands[0])] = min(
            sum(type_bytes(u.type) for u in users[i.name]), type_bytes(i.type)
        )
    return out

  def kernel(self, instr):
    """(category, flops, bytes) of one kernel."""
    category, flops = self.classify(instr)
    return category, flops, type_bytes(instr.type) + self.operand_bytes(instr)

  def walk(self, comp, multiplier, out, _depth=0):
    """Appends (name, category, flops, bytes, multiplier) for each kernel of comp."""
    if _depth > 32:
      self.notes.append(f'recursion too deep at {comp}')
      return
    for instr in self.comps.get(comp, ()):
      op = instr.op
      if op in BOOKKEEPING or op.endswith('-done'):
        continue
      if op == 'while':
        m = re.search(r'"known_trip_count":\s*\{\s*"n":\s*"?(\d+)', instr.attrs)
        trips = int(m.group(1)) if m else 1
        if not m:
          self.notes.append(f'{instr.name}: unknown trip count, its body counted once')
        body = re.search(r'\bbody=%?([\w.\-]+)', instr.attrs)
        cond = re.search(r'\bcondition=%?([\w.\-]+)', instr.attrs)
        for c in (body, cond):
          if c:
            self.walk(c.group(1), multiplier * trips, out, _depth + 1)
        continue
      if op in ('call', 'async-start'):
        for callee in called_computations(instr):
          self.walk(callee, multiplier, out, _depth + 1)
        continue
      if op == 'conditional':  # A lower bound runs the cheapest branch.
        branches = []
        for callee in called_computations(instr):
          kernels = []
          self.walk(callee, multiplier, kernels, _depth + 1)
          branches.append(kernels)
        if branches:
          out.extend(min(branches, key=lambda ks: sum(self.seconds(*k[2:4]) * k[4] for k in ks)))
        self.notes.append(f'{instr.name}: conditional, cheapest branch counted')
        continue
      category, flops, nbytes = self.kernel(instr)
      out.append((instr.name, category, flops, nbytes, multiplier))

  def seconds(self, flops, nbytes):
    return max(flops / self.peak, nbytes / self.bw)


def analyze(hlo_text, *, peak_flops, hbm_bytes_per_s, top=10):
  """Roofline lower bound of the ENTRY computation of an optimized HLO module.

  Returns a dict: kernels, flops, bytes, lower_bound_s, compute_bound_s,
  memory_bound_s, by_category {name: {count, flops, bytes, seconds, share}},
  top_kernels (the `top` slowest; top=None: all), skipped (unparsed lines) and notes.
  """
  comps, entry, skipped = parse_module(hlo_text)
  analyzer = _Analyzer(comps, peak_flops, hbm_bytes_per_s)
  if entry is None:
    analyzer.notes.append('no ENTRY computation found')
  kernels = []
  if entry is not None:
    analyzer.walk(entry, 1, kernels)
  by_cat = {c: collections.Counter() for c in CATEGORIES}
  total = collections.Counter()
  timed = []
  for name, category, flops, nbytes, mult in kernels:
    t_flops, t_bytes = flops / peak_flops, nbytes / hbm_bytes_per_s
    seconds = max(t_flops, t_bytes) * mult
    cat = by_cat[category]
    cat['count'] += mult
    cat['flops'] += flops * mult
    cat['bytes'] += nbytes * mult
    cat['seconds'] += seconds
    total['compute_bound_s' if t_flops > t_bytes else 'memory_bound_s'] += seconds
    timed.append((seconds, name, category, flops * mult, nbytes * mult))
  lower = sum(c['seconds'] for c in by_cat.values())
  timed.sort(reverse=True)
  return {
      'kernels': sum(c['count'] for c in by_cat.values()),
      'flops': sum(c['flops'] for c in by_cat.values()),
      'bytes': sum(c['bytes'] for c in by_cat.values()),
      'lower_bound_s': lower,
      'compute_bound_s': total['compute_bound_s'],
      'memory_bound_s': total['memory_bound_s'],
      'by_category': {
          name: {
              'count': c['count'],
              'flops': c['flops'],
              'bytes': c['bytes'],
              'seconds': c['seconds'],
              'share': c['seconds'] / lower if lower else 0.0,
          }
          for name, c in by_cat.items()
      },
      'top_kernels': [
          {'name': n, 'category': cat, 'flops': f, 'bytes': b, 'seconds': s}
          for s, n, cat, f, b in timed[:top]
      ],
      'peak_flops': peak_flops,
      'hbm_bytes_per_s': hbm_bytes_per_s,
      'skipped': skipped,
      'notes': analyzer.notes,
  }


def mfu_ceiling(result, model_flops):
  """The best MFU this kernel list allows: model flops over peak * lower bound."""
  return model_flops / (result['lower_bound_s'] * result['peak_flops'])


def format_report(result, model_flops=None):
  """A markdown table of the roofline, one row per category."""
  lines = [
      f"{result['kernels']} kernels, {result['flops'] / 1e12:.2f} TFLOP, "
      f"{result['bytes'] / 1e9:.1f} GB: lower bound {result['lower_bound_s'] * 1e3:.2f} ms "
      f"({result['compute_bound_s'] * 1e3:.2f} compute-bound, "
      f"{result['memory_bound_s'] * 1e3:.2f} memory-bound)",
      '',
      '| category | kernels | TFLOP | GB | ms | share |',
      '|---|---:|---:|---:|---:|---:|',
  ]
  for name, c in result['by_category'].items():
    lines.append(
        f"| {name} | {c['count']} | {c['flops'] / 1e12:.2f} | "
        f"{c['bytes'] / 1e9:.1f} | {c['seconds'] * 1e3:.2f} | "
        f"{c['share'] * 100:.1f}% |"
    )
  if model_flops:
    lines += [
        '',
        f'roofline MFU ceiling: {mfu_ceiling(result, model_flops) * 100:.1f}% '
        f'(model {model_flops / 1e12:.2f} TFLOP)',
    ]
  if result['top_kernels']:
    lines += ['', 'slowest kernels:']
    for k in result['top_kernels'][:5]:
      lines.append(
          f"  {k['name']} ({k['category']}): {k['seconds'] * 1e6:.0f} us, "
          f"{k['flops'] / 1e9:.1f} GFLOP, {k['bytes'] / 1e6:.1f} MB"
      )
  if result['skipped'] or result['notes']:
    lines += ['', f"skipped lines: {result['skipped']}"] + [f'note: {n}' for n in result['notes']]
  return '\n'.join(lines)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The command's flags, defined on demand so that importing the module defines none."""
  flags.DEFINE_float(
      'peak_tflops', 989.0, 'Dense peak, TFLOP/s (H100 SXM bf16: 989).', flag_values=flag_values
  )
  flags.DEFINE_float(
      'hbm_tbps', 3.35, 'HBM bandwidth, TB/s (H100 SXM: 3.35).', flag_values=flag_values
  )
  flags.DEFINE_float(
      'model_flops',
      None,
      'Analytic FLOPs of the step, for the MFU ceiling.',
      flag_values=flag_values,
  )


def main(argv, flag_values: flags.FlagValues = flags.FLAGS):
  """app.run's main: argv[1:] are the HLO files; `flag_values` are parsed already."""
  files = argv[1:]
  if not files:
    raise app.UsageError('give at least one optimized HLO text FILE')
  f = flag_values
  for path in files:
    with open(path) as hlo:
      result = analyze(
          hlo.read(), peak_flops=f.peak_tflops * 1e12, hbm_bytes_per_s=f.hbm_tbps * 1e12
      )
    print(f'## {path}\n')
    print(format_report(result, f.model_flops))
    print()


if __name__ == '__main__':
  define_flags()
  app.run(main)
