"""ddep.tools.profile_step: per-op times of a traced step, attributed to model parts."""

import json

import pytest

from ddep.tools import profile_step

_FWD = 'jit(train_step)/jvp(TransUNet.classify)/TransUNet.encode/encoder/'
_BWD = 'jit(train_step)/transpose(jvp(TransUNet.classify))/TransUNet.encode/encoder/'


@pytest.mark.parametrize(
    'op_name, kind, part',
    [
        ('jit(train_step)/mul', 'elementwise', 'optimizer + norms'),
        ('jit(train_step)/jit(clip)/min', 'elementwise', 'optimizer + norms'),
        (_BWD + 'block2/unit1/conv3/conv3.param/mul', 'elementwise', 'weight standardization'),
        (_FWD + 'block1/unit1/gn2/mul', 'elementwise', 'GroupNorm'),
        (_FWD + 'gn_root/mul', 'elementwise', 'GroupNorm'),
        (_BWD + 'Transformer/encoderblock_3/LayerNorm_0/reduce_sum', 'elementwise', 'LayerNorm'),
        (_FWD + 'Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/dot_general',
         'dot', 'attention projections'),  # fmt: skip
        (_BWD + 'Transformer/encoderblock_0/MultiHeadDotProductAttention_1/vmap()/div',
         'elementwise', 'attention core'),  # fmt: skip
        (
            _FWD + 'Transformer/encoderblock_1/MlpBlock_3/Dense_0/dot_general',
            'dot',
            'Transformer MLP',
        ),
        (_FWD + 'block3/unit2/conv2/conv_general_dilated', 'conv', 'ResNet convolutions'),
        (_FWD + 'embedding/dot_general', 'dot', 'ResNet convolutions'),
        (_FWD + 'block3/unit2/jit(relu)/max', 'elementwise', profile_step.OTHER),
        ('jit(train_step)/jvp(TransUNet.__call__)/TransUNet.decode/decoder/block_0/conv_0/'
         'conv_general_dilated', 'conv', 'decoder convolutions'),  # fmt: skip
        (None, 'conv', profile_step.NO_METADATA),
    ],
)
def test_parts(op_name, kind, part):
  assert profile_step.part_of(op_name, kind) == part


_HLO = """HloModule m

%fused_dot (p0: f32[4,8], p1: f32[8,2]) -> f32[4,2] {
  %p0 = f32[4,8]{1,0} parameter(0)
  %p1 = f32[8,2]{1,0} parameter(1)
  %neg = f32[4,8]{1,0} negate(%p0), metadata={op_name="jit(f)/jvp(g)/encoder/act/neg"}
  ROOT %dot.1 = f32[4,2]{1,0} dot(%neg, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(f)/jvp(g)/encoder/embedding/dot_general"}
}

ENTRY %main (a: f32[4,8], b: f32[8,2]) -> f32[2,4] {
  %a = f32[4,8]{1,0} parameter(0)
  %b = f32[8,2]{1,0} parameter(1)
  %ynn_fusion.3 = f32[4,2]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused_dot
  ROOT %transpose.2 = f32[2,4]{1,0} transpose(%ynn_fusion.3), dimensions={1,0}
}
"""


def test_instruction_table_names_fusions_by_their_dot():
  table = profile_step.instruction_table(_HLO)
  assert table['ynn_fusion.3'] == {
      'op_name': 'jit(f)/jvp(g)/encoder/embedding/dot_general',
      'kind': 'dot',
      'opcode': 'fusion',
  }
  assert table['transpose.2']['kind'] == 'copy' and table['transpose.2']['op_name'] is None
  assert 'dot.1' not in table and 'neg' not in table  # Inside the fusion's own event.


def test_profile_of_the_tiny_classify_step(tmp_path):
  out = tmp_path / 'profile.jsonl'
  result = profile_step.main(
      '--preset=tiny --task=classify --image_size=32 --batch_size=2 --num_classes=5 '
      f'--eval_size=0 --warmup=1 --profile_steps=2 --output={out}'.split()
  )
  parts = {p['name']: p['seconds'] for p in result['parts']}
  for part in ('optimizer + norms', 'ResNet convolutions', 'Transformer MLP', 'GroupNorm'):
    assert parts.get(part, 0) > 0, (part, parts)
  assert sum(p['share'] for p in result['parts']) == pytest.approx(1.0)
  assert result['op_seconds_per_step'] == pytest.approx(sum(parts.values()))
  # Two threads at most ran ops concurrently (the host's default pool on 2 cores).
  assert 0 < result['op_seconds_per_step'] < 4 * result['wall_s_per_step']
  (row,) = [json.loads(line) for line in out.read_text().splitlines()]
  assert row['phase'] == 'classify' and len(row['top_ops']) == 10
