"""The benchmark tool: its pure helpers, and a tiny CPU run without TF, clu or ml_collections.

Nothing here asserts a speed: CPU timings in tests say nothing about an accelerator.
"""

import json
import os
import subprocess
import sys
import types

from absl import app
import pytest

from ddep.tools import benchmark
from ddep.tools import gpu_targets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCKED = ('tensorflow', 'tensorflow_datasets', 'clu', 'ml_collections')


@pytest.mark.parametrize(
    'kind,name,tflops',
    [
        ('NVIDIA H100 80GB HBM3', 'H100 SXM', 989.0),
        ('NVIDIA H100 PCIe', 'H100 PCIe', 756.0),
        ('NVIDIA H100 NVL', None, None),  # not the SXM part's 989
        ('NVIDIA H200', 'H200 SXM', 989.0),
        ('NVIDIA A100-SXM4-80GB', 'A100', 312.0),
        ('TPU v4', 'TPU v4', 275.0),
        ('TPU v5 lite', 'TPU v5e', 197.0),
        ('TPU v5', 'TPU v5p', 459.0),
        ('TPU v5p', 'TPU v5p', 459.0),
        ('TPU v6 lite', 'TPU v6e', 918.0),
        ('cpu', None, None),
        ('NVIDIA GeForce RTX 4090', None, None),
    ],
)
def test_peak_table(kind, name, tflops):
  assert benchmark.peak_bf16_tflops(kind) == (name, tflops)


@pytest.mark.parametrize(
    'kind,rate',
    [
        ('NVIDIA H100 80GB HBM3', 3.35e12),
        ('NVIDIA H100 PCIe', 2.0e12),
        ('NVIDIA H100 NVL', None),
        ('NVIDIA H200', 4.8e12),
        ('NVIDIA A100-SXM4-80GB', 2.039e12),
        ('NVIDIA A100-SXM4-40GB', 1.555e12),
        ('TPU v4', None),
        ('cpu', None),
    ],
)
def test_hbm_bandwidth_table(kind, rate):
  assert benchmark.hbm_bytes_per_s(kind) == rate


@pytest.mark.parametrize(
    'max_per_device,devices,expected',
    [
        (32, 1, (32, 4)),  # the paper's 128 as 4 x 32
        (48, 1, (32, 4)),  # largest divisor of 128 that fits
        (256, 1, (128, 1)),  # no accumulation needed
        (16, 8, (16, 1)),
        (3, 2, (2, 32)),
    ],
)
def test_accumulation_plan(max_per_device, devices, expected):
  micro, accum = benchmark.accumulation_plan(max_per_device, 128, devices)
  assert (micro, accum) == expected
  assert micro * accum * devices == 128


def test_largest_fitting_batch_doubles_until_out_of_memory():
  tried = []

  def fits(b):
    tried.append(b)
    return b <= 12

  assert benchmark.largest_fitting_batch(fits, 1, 256) == 8
  assert tried == [1, 2, 4, 8, 16]
  assert benchmark.largest_fitting_batch(lambda b: True, 2, 16) == 16
  assert benchmark.largest_fitting_batch(lambda b: False, 1, 16) is None


def test_is_oom():
  assert benchmark.is_oom(
      RuntimeError('RESOURCE_EXHAUSTED: Out of memory while trying to ' 'allocate 12.3GiB')
  )
  assert not benchmark.is_oom(ValueError('INVALID_ARGUMENT: shapes differ'))


def test_count_auto_remat():
  hlo = """ENTRY %main {
  %fusion.12 = bf16[16,64]{1,0} fusion(%p0), kind=kLoop, calls=%fused_computation.12
  %fusion.12.remat = bf16[16,64]{1,0} fusion(%p0), kind=kLoop, calls=%fused_computation.12
  %cudnn-conv.3.remat2 = (bf16[16,64]{1,0}, u8[0]{0}) custom-call(%a, %b)
  ROOT %copy.remat_like = bf16[16,64]{1,0} copy(%fusion.12)
  %x = f32[] add(%y, %z), metadata={op_name="jit(f)/remat/add"}
}"""
  # The clones, not an op name that merely contains 'remat'.
  assert benchmark.count_auto_remat(hlo) == 2
  assert benchmark.count_auto_remat(hlo.replace('.remat', '')) == 0


def test_a_batch_fits_unless_xla_recomputes_much():
  fits = benchmark.recomputes_little
  assert fits({'xla_auto_remat': 0, 'xla_auto_remat_share': None})
  # Near the limit XLA often recomputes a few cheap kernels (9 at DeP 64 on an H100).
  assert fits({'xla_auto_remat': 9, 'xla_auto_remat_share': 0.001})
  assert not fits({'xla_auto_remat': 900, 'xla_auto_remat_share': 0.05})
  assert not fits({'xla_auto_remat': 9, 'xla_auto_remat_share': None})  # No roofline (CPU).


def _flops_program(attention_flops=0.0):
  attention = types.SimpleNamespace(
      part='transformer: attention',
      flops=attention_flops,
      backward_flops=lambda trained: 2 * attention_flops,
  )
  return types.SimpleNamespace(analytic=100.0, ops=[attention], trained=True)


@pytest.mark.parametrize(
    'platform,lowered,roofline,fused,want',
    [
        # CPU: the compiled program's own count.
        ('cpu', 95.0, None, False, (40.0, 'xla_cost_analysis', 100.0)),
        # GPU: cuDNN/cuBLAS custom calls count 0 once compiled; the lowered HLO counts them.
        ('gpu', 95.0, None, False, (95.0, 'xla_lowered_cost_analysis', 100.0)),
        # ... and fused attention is a custom call there too: compared without it.
        ('gpu', 95.0, None, True, (95.0, 'xla_lowered_cost_analysis', 70.0)),
        # No lowered count: the compiled HLO's, else nothing.
        ('gpu', 0.0, {'flops': 97.0}, False, (97.0, 'hlo_roofline', 100.0)),
        ('gpu', 0.0, None, False, (None, 'unavailable', 100.0)),
    ],
)
def test_xla_flops_on_gpu_come_from_the_lowered_hlo(platform, lowered, roofline, fused, want):
  notes = []
  got = benchmark.xla_flops_against_analytic(
      _flops_program(attention_flops=10.0),
      {'flops': 40.0},
      {'roofline': roofline, 'fused_attention': fused},
      notes,
      xla_lowered={'flops': lowered},
      platform=platform,
  )
  assert got == want
  says_why = want[1] in ('xla_lowered_cost_analysis', 'unavailable')
  assert says_why == any('custom calls' in n for n in notes), notes


def test_time_steps_syncs_once_per_trial():
  calls, blocks = [], []
  times = benchmark.time_steps(
      lambda: calls.append(1), warmup=2, steps=5, trials=3, block=lambda: blocks.append(len(calls))
  )
  assert len(calls) == 2 + 5 * 3
  # One block after warm-up, then exactly one at the end of each trial.
  assert blocks == [2, 7, 12, 17]
  assert len(times) == 3 and all(t >= 0 for t in times)


def test_parse_args():
  args = benchmark.parse_args(
      [
          '--task',
          'segment,ddep',
          '--image_size',
          '256x512',
          '--eval_size',
          '0',
          '--remat',
          'decoder',
      ]
  )
  assert args.task == ('segment', 'ddep') and args.image_size == (256, 512)
  assert args.eval_size is None and args.remat == ('decoder',)
  assert benchmark.phases_of(args) == ['segment', 'ddep']
  # absl: '--flag=value' as well; a repeated flag keeps its last value (run_isolated's
  # overrides rely on it).
  args = benchmark.parse_args(['--image_size=64', '--output=a', '--output', 'b', '--eval_size='])
  assert args.image_size == (64, 64) and args.output == 'b' and args.eval_size is None
  with pytest.raises(app.UsageError, match='unknown --task'):
    benchmark.parse_args(['--task', 'pretrain'])
  with pytest.raises(app.UsageError, match='divisible by 16'):
    benchmark.parse_args(['--image_size', '100'])
  with pytest.raises(app.UsageError, match='image_size.*N or HxW'):
    benchmark.parse_args(['--image_size', '16x'])


def test_per_device_batch_flag_plan_or_config_split():
  args = benchmark.parse_args(['--batch_size', '4', '--eval_batch_size', '2'])
  split = benchmark._per_device_batch  # pylint: disable=protected-access
  assert split(args, is_eval=False, accum=1, n_dev=2, per_device_batch=None) == 4
  assert split(args, is_eval=True, accum=1, n_dev=2, per_device_batch=None) == 2
  assert split(args, is_eval=False, accum=1, n_dev=2, per_device_batch=16) == 16  # A plan's.
  # --config: its global batch over devices x accumulation steps, which must divide it.
  args.batch_size, args.global_batch = None, 128
  assert split(args, is_eval=False, accum=4, n_dev=2, per_device_batch=None) == 16
  with pytest.raises(SystemExit, match='does not split over 3 devices x 4'):
    split(args, is_eval=False, accum=4, n_dev=3, per_device_batch=None)


def test_config_sets_the_flags_not_given():
  args = benchmark.parse_args(
      [
          '--config',
          'configs/finetune_cityscapes.py:method=none',
          '--batch_size',
          '4',
          '--remat',
          'decoder',
      ]
  )
  # From the config: the paper's fine-tuning setting and its eval protocol (two
  # 1024x1024 halves, each with its flip, Sec. 4.3).
  assert (args.preset, args.dtype, args.task) == ('r50_vit_b16', 'bfloat16', ('segment',))
  assert args.image_size == (1024, 1024) and args.num_classes == 19
  assert args.eval_size == (1024, 1024) and args.eval_flip
  assert args.global_batch == 16 and args.frozen == ()
  # Given explicitly: kept.
  assert args.batch_size == 4 and args.remat == ('decoder',)
  assert benchmark.phases_of(args) == ['segment', 'eval', 'input']

  args = benchmark.parse_args(
      ['--config', 'configs/pretrain_cityscapes.py:method=ddep', '--input_batches', '0']
  )
  assert args.task == ('ddep',) and args.frozen == ('encoder/.*',)
  assert args.loss.denoise.sigma == 0.1 and args.image_size == (512, 512)
  # The config's global batch (128), split over the devices when the phase runs.
  assert args.batch_size is None and args.global_batch == 128
  assert benchmark.phases_of(args) == ['ddep']

  # --config.key=value overrides, as in ddep.main: the config's batch of 128 becomes 32.
  args = benchmark.parse_args(
      [
          '--config=configs/pretrain_cityscapes.py:method=ddep',
          '--config.data.batch_size=32',
          '--input_batches=0',
      ]
  )
  assert args.global_batch == 32 and args.config_overrides == {'data.batch_size': 32}
  assert args.config == 'configs/pretrain_cityscapes.py:method=ddep'

  with pytest.raises(app.UsageError, match='no such file'):
    benchmark.parse_args(['--config', 'configs/nope.py'])


def test_config_run_times_its_steps_and_input_pipeline(tmp_path):
  out = tmp_path / 'bench.jsonl'
  cmd = [
      sys.executable,
      '-m',
      'ddep.tools.benchmark',
      '--no_isolate',
      '--output',
      str(out),
      '--config',
      'configs/pretrain_cityscapes.py:method=dep,runlocal',
      '--config.data.batch_size=4',  # An override reaches both phases.
      '--steps',
      '2',
      '--trials',
      '1',
      '--warmup',
      '1',
      '--input_batches',
      '2',
  ]
  env = dict(os.environ, TFDS_DATA_DIR=str(tmp_path / 'tfds'))
  proc = subprocess.run(
      cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False, timeout=600
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = {r['phase']: r for r in map(json.loads, out.read_text().splitlines())}
  assert list(rows) == ['denoise', 'input']
  step, data = rows['denoise'], rows['input']
  assert step['config'].startswith('configs/pretrain_cityscapes.py')
  assert step['preset'] == 'tiny' and step['global_batch'] == 4 and step['frozen'] == []
  assert step['state_layouts'] == 'auto'  # config.mesh.state_layouts, as the trainer's.
  assert step['config_overrides'] == data['config_overrides'] == {'data.batch_size': 4}
  assert step['loss_finite'] and 1.0 < step['xla_over_analytic'] < 1.15
  assert data['dataset'] == 'demo_tiny' and data['per_host_batch'] == 4
  assert data['images_per_s'] > 0
  assert 'input pipeline (demo_tiny' in proc.stdout


@pytest.mark.parametrize('name', sorted(gpu_targets.TARGETS))
def test_gpu_targets_describe_hopper_parts_the_peak_table_knows(name):
  text = gpu_targets.target_config(name)
  target = gpu_targets.TARGETS[name]
  assert f'device_memory_size: {target["memory_bytes"]}' in text
  assert f'memory_bandwidth: {target["bandwidth"]}' in text
  assert 'cuda_compute_capability {\n    major: 9' in text and 'core_count: 132' in text
  # The device kind XLA reports is the description: MFU must find its peak.
  assert benchmark.peak_bf16_tflops(target['description'])[1] == 989.0
  with pytest.raises(ValueError, match='unknown GPU target'):
    gpu_targets.target_config('a100')


def test_target_implies_compile_only_and_gpu_attention():
  args = benchmark.parse_args(['--target', 'h100', '--find_max_batch'])
  assert args.compile_only and args.find_max_batch
  # The per-backend choice on a GPU (tracing here would see the host's backend).
  assert args.attention_impl == 'cudnn'
  args = benchmark.parse_args(['--target', 'h200', '--attention_impl', 'xla'])
  assert args.attention_impl == 'xla'
  with pytest.raises(app.UsageError, match='cannot be --compile_only'):
    benchmark.parse_args(['--compile_only', '--find_max_batch'])  # Without a target: runs.


def test_target_without_the_cuda_plugin_says_what_to_install():
  try:
    import jax_plugins.xla_cuda13  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import

    pytest.skip('the CUDA plugin is installed here')
  except ImportError:
    pass
  with pytest.raises(SystemExit, match=r'needs the CUDA plugin.*jax\[cuda13\]'):
    benchmark.main(
        [
            '--target',
            'h100',
            '--preset',
            'tiny',
            '--image_size',
            '32',
            '--task',
            'ddep',
            '--eval_size',
            '0',
            '--quiet',
        ]
    )


def test_protocol_input_is_one_eval_call():
  assert benchmark.protocol_input('cityscapes_halves', (8, 8)) == (1024, 1024)
  assert benchmark.protocol_input('ade20k_sliding', (8, 8)) == (512, 512)
  assert benchmark.protocol_input('pascal_context_sliding', (8, 8)) == (480, 480)
  assert benchmark.protocol_input('whole', (8, 8)) == (8, 8)


def test_run_isolated_runs_each_phase_in_its_own_process():
  commands, outputs = [], []

  def fake_run(cmd, check):
    del check
    commands.append(cmd)
    args = benchmark.parse_args(cmd[3:])  # What the child would see.
    outputs.append(args.output)
    with open(args.output, 'a') as f:
      f.write(json.dumps({'phase': args.only_phase, 'task': list(args.task)}) + '\n')
    return subprocess.CompletedProcess(cmd, 0)

  argv = ['--preset', 'tiny', '--task', 'denoise,ddep', '--output', 'all.jsonl']
  rows = benchmark.run_isolated(argv, ['denoise', 'ddep', 'eval'], run=fake_run)
  assert [r['phase'] for r in rows] == ['denoise', 'ddep', 'eval']
  assert all(cmd[1:3] == ['-m', 'ddep.tools.benchmark'] for cmd in commands)
  # The children write to their own files, never to the parent's --output.
  assert 'all.jsonl' not in outputs and len(set(outputs)) == 3


def test_a_failed_phase_keeps_the_others_results(tmp_path, monkeypatch):
  def fake_isolated(argv, phases):
    del argv
    if phases == ['ddep']:
      raise SystemExit('phase ddep failed (exit 1)')
    return [{'phase': p} for p in phases]

  monkeypatch.setattr(benchmark, 'run_isolated', fake_isolated)
  out = tmp_path / 'rows.jsonl'
  with pytest.raises(SystemExit, match='phase ddep failed'):
    benchmark.main(['--task', 'denoise,ddep', '--eval_size', '64', '--output', str(out), '--quiet'])
  assert [json.loads(x)['phase'] for x in out.read_text().splitlines()] == ['denoise', 'eval']


@pytest.fixture(scope='module')
def blocked_env(tmp_path_factory):
  """An environment whose Python cannot import TF, TFDS, clu or ml_collections.

  Shadow packages that raise on import, first on PYTHONPATH, so that the tool's
  child processes (one per phase) are blocked too.
  """
  root = tmp_path_factory.mktemp('blocked')
  for name in BLOCKED:
    (root / name).mkdir()
    (root / name / '__init__.py').write_text(
        f'raise ImportError("{name} is blocked: the benchmark must run without it")\n'
    )
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), REPO]))
  for name in BLOCKED:  # The block itself works, so the run below proves something.
    proc = subprocess.run(
        [sys.executable, '-c', f'import {name}'],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode != 0 and 'is blocked' in proc.stderr
  return env


def test_without_ml_collections_only_config_is_refused(blocked_env):
  """The bare GPU image: the module imports and parses; --config says what it needs."""
  cmd = [
      sys.executable,
      '-m',
      'ddep.tools.benchmark',
      '--config=configs/pretrain_ade20k.py',
      '--quiet',
  ]
  proc = subprocess.run(
      cmd, env=blocked_env, cwd=REPO, capture_output=True, text=True, check=False, timeout=120
  )
  assert proc.returncode == 1 and '--config needs ml_collections' in proc.stderr, proc.stderr
  assert 'Traceback' not in proc.stderr  # A usage error, not a crash.


# XLA counts what the analytic count leaves out (norms, activations, softmax, the loss,
# weight standardization), which at 32x32 in a 16-channel model is 5-10%; a missing or
# doubled backward pass would be off by 30% or more. The tiny encoder alone does few FLOPs
# per element, so the norms weigh more in the classify step (1.009 for the full-size
# encoder at 224^2).
MAX_XLA_OVER_ANALYTIC = {'classify': 1.4}


@pytest.fixture(scope='module')
def tool_run(blocked_env, tmp_path_factory):
  """(rows by phase, stdout) of one run of the tool without TF, clu or ml_collections:
  every kind of step (the DeP, DDeP, fine-tuning and classify train steps, and the eval
  step with the flip of Sec. 4.3), in one process (the per-phase processes of
  run_isolated are tested above; one per phase would multiply the start-up)."""
  out = tmp_path_factory.mktemp('tool') / 'bench.jsonl'
  cmd = [
      sys.executable,
      '-m',
      'ddep.tools.benchmark',
      '--preset',
      'tiny',
      '--image_size',
      '32',
      '--batch_size',
      '2',
      '--steps',
      '2',
      '--trials',
      '2',
      '--warmup',
      '1',
      '--output',
      str(out),
      '--task',
      'denoise,ddep,segment,classify',
      '--eval_size',
      '32x64',
      '--num_classes',
      '5',
      '--eval_flip',
      '--state_layouts',
      'default',
      '--no_isolate',
  ]
  proc = subprocess.run(
      cmd, env=blocked_env, cwd=REPO, capture_output=True, text=True, check=False, timeout=600
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  return {r['phase']: r for r in rows}, proc.stdout


def test_every_row_of_the_tool_run_is_complete_and_its_flops_agree(tool_run):
  rows, _ = tool_run
  assert list(rows) == ['denoise', 'ddep', 'segment', 'classify', 'eval']
  for r in rows.values():
    assert r['device_kind'] and r['platform'] == 'cpu'
    assert r['state_layouts'] == 'default'  # The flag, not the config's or the default.
    assert r['step_time_s'] > 0 and len(r['trial_step_times_s']) == 2
    assert r['images_per_s'] == pytest.approx(r['global_batch'] / r['step_time_s'])
    assert r['xla_flops'] > 0 and r['analytic_flops'] > 0
    assert r['xla_memory']['total_bytes'] > 0
    # No peak for a CPU: MFU is omitted, with a note saying why.
    assert r['mfu'] is None and any('no peak' in n for n in r['notes'])
    # The eval row is run with the flip (Sec. 4.3): its second forward must be in the
    # analytic count too.
    bound = MAX_XLA_OVER_ANALYTIC.get(r['phase'], 1.15)
    assert 1.0 < r['xla_over_analytic'] < bound, (r['phase'], r['xla_over_analytic'])


def test_dep_and_ddep_steps_without_tensorflow(tool_run):
  rows, stdout = tool_run
  assert 'DDeP/DeP per image: time' in stdout
  dep, ddep = rows['denoise'], rows['ddep']
  assert dep['per_device_batch'] == ddep['per_device_batch'] == 2
  assert dep['image_size'] == [32, 32]
  assert dep['loss_finite'] and ddep['loss_finite']
  # DDeP trains the decoder only: fewer trainable parameters, the rest frozen.
  assert dep['frozen_params'] == 0 and ddep['frozen_params'] > 0
  assert dep['trainable_params'] == dep['params'] == ddep['params']
  assert ddep['trainable_params'] + ddep['frozen_params'] == dep['params']
  # ...and its frozen encoder has no backward pass, in XLA's count as in ours.
  assert ddep['analytic_flops'] < 0.95 * dep['analytic_flops']
  assert ddep['xla_flops'] < 0.95 * dep['xla_flops']
  # Adam's per-parameter work, measured apart: ~20 FLOPs per trained parameter.
  assert 10 < dep['xla_optimizer_flops'] / dep['trainable_params'] < 40


def test_segment_and_eval_steps_without_tensorflow(tool_run):
  rows, _ = tool_run
  seg, ev = rows['segment'], rows['eval']
  assert seg['num_classes'] == ev['num_classes'] == 5 and seg['loss_finite']
  assert ev['image_size'] == [32, 64] and ev['per_device_batch'] == 1
  assert ev['xla_optimizer_flops'] == 0 and ev['trainable_params'] is None
  assert ev['params'] == seg['params']
  assert ev['analytic_flops'] == ev['analytic_forward_flops']


def test_classify_step_trains_the_encoder_and_head_only(tool_run):
  # The encoder train step timm's vit_base_r50_s16_224 is compared with
  # (docs/performance_cpu.md): no decoder parameters, so Adam updates none.
  from ddep.models import flops as flops_lib  # pylint: disable=g-import-not-at-top
  from ddep.models import presets  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  row = tool_run[0]['classify']
  assert row['phase'] == 'classify' and row['num_classes'] == 5 and row['loss_finite']
  assert 0 < row['process_cpu_s_per_step'] and row['step_time_s'] > 0
  model = presets.create_model('tiny', num_image_classes=5)
  params = jax.eval_shape(
      lambda: model.init(jax.random.key(0), np.zeros((1, 32, 32, 3)), method=type(model).classify)
  )['params']
  assert set(params) == {'encoder', 'classifier'}
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  assert row['params'] == row['trainable_params'] == n and row['frozen_params'] == 0
  ops = flops_lib.model_ops(model, (32, 32), 2)
  assert row['analytic_forward_flops'] == flops_lib.encoder_flops(ops) + 2 * 2 * 64 * 5
