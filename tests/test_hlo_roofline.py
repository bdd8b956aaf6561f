"""hlo_roofline on small hand-written HLO, modelled on lines of real XLA:GPU dumps."""

from absl import app
from absl import flags
import pytest

from ddep.tools import hlo_roofline

_BC = (
    'backend_config={"operation_queue_id":"0","cudnn_conv_backend_config":'
    '{"activation_mode":"kNone","conv_result_scale":1},"force_earliest_schedule":false}'
)
_META = 'metadata={op_name="jit(train_step)/jvp(TransUNet)/conv_general_dilated" stack_frame_id=5}'

# Three cuDNN convs with one forward shape, x [2,8,8,4] * w [8,3,3,4] (o01i) -> y [2,8,8,8]:
# the forward, its filter gradient, and the input gradient of a stride-2 conv of a
# [2,17,17,4] input to the same y (so that mixing up dx and dy changes the count).
CONVS = f"""HloModule jit_train_step, entry_computation_layout={{(bf16[2,8,8,4]{{3,2,1,0}})->bf16[2,17,17,4]{{3,2,1,0}}}}

ENTRY %main.1 (x.1: bf16[2,8,8,4], w.1: bf16[8,3,3,4], dy.1: bf16[2,8,8,8]) -> bf16[2,17,17,4] {{
  %x.1 = bf16[2,8,8,4]{{3,2,1,0}} parameter(0), metadata={{scheduling_name="x.1"}}
  %w.1 = bf16[8,3,3,4]{{3,2,1,0}} parameter(1)
  %dy.1 = bf16[2,8,8,8]{{3,2,1,0}} parameter(2)
  %cudnn-conv.1 = (bf16[2,8,8,8]{{3,2,1,0}}, u8[0]{{0}}) custom-call(%x.1, %w.1), window={{size=3x3 pad=1_1x1_1}}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convForward", {_META}, {_BC}
  %cudnn-conv-bw-filter.2 = (bf16[8,3,3,4]{{3,2,1,0}}, u8[0]{{0}}) custom-call(%x.1, %dy.1), window={{size=3x3 pad=1_1x1_1}}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convBackwardFilter", {_META}, {_BC}
  %cudnn-conv-bw-input.3 = (bf16[2,17,17,4]{{3,2,1,0}}, u8[0]{{0}}) custom-call(%dy.1, %w.1), window={{size=3x3 stride=2x2}}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convBackwardInput", {_META}, {_BC}
  %get-tuple-element.4 = bf16[2,17,17,4]{{3,2,1,0}} get-tuple-element(%cudnn-conv-bw-input.3), index=0
  ROOT %bitcast.5 = bf16[2,17,17,4]{{3,2,1,0}} bitcast(%get-tuple-element.4)
}}
"""
CONV_FLOPS = 2 * (2 * 8 * 8 * 8) * 9 * 4  # 2 * out elements * window * c_in.

# A Triton gemm fusion as XLA writes the fused q/k/v projection: a concatenate of
# the kernels, then a dot that contracts dim 0 of the concatenate.
GEMM = """HloModule m

%gemm_fusion_dot.1_computation (parameter_0: bf16[64,16], parameter_1: bf16[16,8], parameter_2: bf16[16,8]) -> bf16[64,16] {
  %parameter_1 = bf16[16,8]{1,0} parameter(1), metadata={scheduling_name="parameter_1"}
  %parameter_2 = bf16[16,8]{1,0} parameter(2)
  %concatenate.1 = bf16[16,16]{1,0} concatenate(%parameter_1, %parameter_2), dimensions={1}
  %parameter_0 = bf16[64,16]{1,0} parameter(0)
  %dot.1 = bf16[16,64]{0,1} dot(%concatenate.1, %parameter_0), lhs_contracting_dims={0}, rhs_contracting_dims={1}, metadata={op_name="jit(train_step)/query/dot_general"}, backend_config={"sizes":["16"]}
  ROOT %bitcast.1 = bf16[64,16]{1,0} bitcast(%dot.1)
}

ENTRY %main (a: bf16[64,16], b: bf16[16,8], c: bf16[16,8]) -> bf16[64,16] {
  %a = bf16[64,16]{1,0} parameter(0)
  %b = bf16[16,8]{1,0} parameter(1)
  %c = bf16[16,8]{1,0} parameter(2)
  ROOT %gemm_fusion_dot.1 = bf16[64,16]{1,0} fusion(%a, %b, %c), kind=kCustom, calls=%gemm_fusion_dot.1_computation, metadata={op_name="jit(train_step)/dot_general"}, backend_config={"operation_queue_id":"0","fusion_backend_config":{"kind":"__triton_nested_gemm_fusion","block_level_fusion_config":{"num_warps":"2","output_tiles":[{"sizes":["8","16"]}]}}}
}
"""

# cuDNN flash attention, q/k/v/o/do in [B, T, N, H] = [2, 16, 3, 8].
_DN = (
    '"bmm1_dot_dimension_numbers": {"lhs_contracting_dimensions": ["3"], '
    '"rhs_contracting_dimensions": ["3"], "lhs_batch_dimensions": ["0", "2"], '
    '"rhs_batch_dimensions": ["0", "2"]}, "bmm2_dot_dimension_numbers": '
    '{"lhs_contracting_dimensions": ["3"], "rhs_contracting_dimensions": ["1"], '
    '"lhs_batch_dimensions": ["0", "1"], "rhs_batch_dimensions": ["0", "2"]}'
)
FMHA = f"""HloModule m

ENTRY %main (q: bf16[2,16,3,8], k: bf16[2,16,3,8], v: bf16[2,16,3,8], do: bf16[2,16,3,8]) -> bf16[2,3,16,8] {{
  %q = bf16[2,16,3,8]{{3,2,1,0}} parameter(0)
  %k = bf16[2,16,3,8]{{3,2,1,0}} parameter(1)
  %v = bf16[2,16,3,8]{{3,2,1,0}} parameter(2)
  %do = bf16[2,16,3,8]{{3,2,1,0}} parameter(3)
  %dot_product_attention_fwd.1 = (bf16[2,3,16,8]{{3,1,2,0}}, f32[2,3,16]{{2,1,0}}, u8[0]{{0}}) custom-call(%q, %k, %v), custom_call_target="__cudnn$fmhaSoftmax", operand_layout_constraints={{bf16[2,16,3,8]{{3,2,1,0}}, bf16[2,16,3,8]{{3,2,1,0}}, bf16[2,16,3,8]{{3,2,1,0}}}}, api_version=API_VERSION_STATUS_RETURNING, metadata={{op_name="jit(train_step)/dot_product_attention_fwd"}}, backend_config={{"operation_queue_id": "0", "cudnn_fmha_backend_config": {{"fmha_scale": 0.125, {_DN}, "dropout_rate": 0.0}}}}
  %o = bf16[2,3,16,8]{{3,1,2,0}} get-tuple-element(%dot_product_attention_fwd.1), index=0
  %stats = f32[2,3,16]{{2,1,0}} get-tuple-element(%dot_product_attention_fwd.1), index=1
  %dot_product_attention_bwd.2 = (bf16[2,3,16,8]{{3,1,2,0}}, bf16[2,3,16,8]{{3,1,2,0}}, bf16[2,3,16,8]{{3,1,2,0}}, u8[0]{{0}}) custom-call(%q, %k, %v, %stats, %do, /*index=5*/%o), custom_call_target="__cudnn$fmhaSoftmaxBackward", api_version=API_VERSION_STATUS_RETURNING, backend_config={{"operation_queue_id": "0", "cudnn_fmha_backend_config": {{{_DN}}}}}
  ROOT %r = bf16[2,3,16,8]{{3,1,2,0}} get-tuple-element(%dot_product_attention_bwd.2), index=0
}}
"""
FMHA_FWD_FLOPS = 4 * 2 * 3 * 16 * 16 * 8  # 4 * B * N * T * S * H.
QKV_BYTES = 2 * 16 * 3 * 8 * 2  # One bf16 [2, 16, 3, 8].

# Loop fusions, copies and a while loop that runs its body 5 times.
LOOP = """HloModule m

%fused_add (param_0: f32[4,8], param_1: f32[8]) -> f32[4,8] {
  %param_0 = f32[4,8]{1,0} parameter(0)
  %param_1 = f32[8]{0} parameter(1)
  %broadcast.1 = f32[4,8]{1,0} broadcast(%param_1), dimensions={1}
  ROOT %add.1 = f32[4,8]{1,0} add(%param_0, %broadcast.1)
}

%fused_transpose (param_0.1: f32[4,8]) -> f32[8,4] {
  %param_0.1 = f32[4,8]{1,0} parameter(0)
  ROOT %transpose.1 = f32[8,4]{1,0} transpose(%param_0.1), dimensions={1,0}
}

%body (p: (s32[], f32[4,8], f32[8])) -> (s32[], f32[4,8], f32[8]) {
  %p = (s32[], f32[4,8]{1,0}, f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[4,8]{1,0} get-tuple-element(%p), index=1
  %b = f32[8]{0} get-tuple-element(%p), index=2
  %loop_add_fusion.2 = f32[4,8]{1,0} fusion(%x, %b), kind=kLoop, calls=%fused_add
  ROOT %t = (s32[], f32[4,8]{1,0}, f32[8]{0}) tuple(%i, %loop_add_fusion.2, %b)
}

%cond (p.1: (s32[], f32[4,8], f32[8])) -> pred[] {
  %p.1 = (s32[], f32[4,8]{1,0}, f32[8]{0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main (x.1: f32[4,8], b.1: f32[8], n.1: s32[]) -> f32[8,4] {
  %x.1 = f32[4,8]{1,0} parameter(0)
  %b.1 = f32[8]{0} parameter(1)
  %n.1 = s32[] parameter(2)
  %loop_add_fusion.1 = f32[4,8]{1,0} fusion(%x.1, %b.1), kind=kLoop, calls=%fused_add, metadata={op_name="jit(train_step)/add"}
  %copy.1 = s32[] copy(%n.1)
  %tuple.1 = (s32[], f32[4,8]{1,0}, f32[8]{0}) tuple(%copy.1, %loop_add_fusion.1, %b.1)
  %while.1 = (s32[], f32[4,8]{1,0}, f32[8]{0}) while(%tuple.1), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  %y = f32[4,8]{1,0} get-tuple-element(%while.1), index=1
  ROOT %transpose_fusion.1 = f32[8,4]{1,0} fusion(%y), kind=kInput, calls=%fused_transpose
}
"""
ADD_BYTES = (32 + 8 + 32) * 4  # Two f32[4,8] and an f32[8].


def _analyze(text, peak_flops=1e12, hbm_bytes_per_s=1e9):
  return hlo_roofline.analyze(text, peak_flops=peak_flops, hbm_bytes_per_s=hbm_bytes_per_s)


def test_type_bytes():
  assert hlo_roofline.type_bytes('bf16[16,512,512,64]{3,2,1,0}') == 16 * 512 * 512 * 64 * 2
  assert hlo_roofline.type_bytes('(f32[2,3]{1,0}, s32[], u8[0]{0}, pred[5]{0})') == 24 + 4 + 5
  assert hlo_roofline.type_bytes('(s64[2], (f16[4], u8[3]))') == 16 + 8 + 3


def test_convs():
  r = _analyze(CONVS)
  conv = r['by_category']['conv']
  assert conv['count'] == 3 and r['kernels'] == 3
  assert conv['flops'] == 3 * CONV_FLOPS
  x, w, y = 2 * 8 * 8 * 4 * 2, 8 * 9 * 4 * 2, 2 * 8 * 8 * 8 * 2
  dx = 2 * 17 * 17 * 4 * 2
  assert conv['bytes'] == (x + w + y) * 2 + (dx + w + y)  # Each touches an x, w and y.
  assert r['skipped'] == 0


def test_gemm_fusion():
  r = _analyze(GEMM)
  gemm = r['by_category']['gemm']
  assert gemm['count'] == 1
  assert gemm['flops'] == 2 * 64 * 16 * 16
  assert gemm['bytes'] == (64 * 16 + 2 * 16 * 8 + 64 * 16) * 2


def test_fmha():
  r = _analyze(FMHA)
  att = r['by_category']['attention']
  assert att['count'] == 2
  assert att['flops'] == FMHA_FWD_FLOPS * (1 + hlo_roofline.FMHA_BACKWARD_FACTOR)
  stats = 2 * 3 * 16 * 4
  fwd_bytes = 3 * QKV_BYTES + QKV_BYTES + stats
  bwd_bytes = (3 * QKV_BYTES + stats + 2 * QKV_BYTES) + 3 * QKV_BYTES
  assert att['bytes'] == fwd_bytes + bwd_bytes


def test_loop_fusion_copy_and_while():
  r = _analyze(LOOP)
  cats = r['by_category']
  elementwise = cats['elementwise/reduction fusions']
  assert elementwise['count'] == 1 + 5  # Outside the loop, then 5 trips.
  assert elementwise['bytes'] == 6 * ADD_BYTES
  assert elementwise['flops'] == 0
  move = cats['copy/transpose']
  assert move['count'] == 2  # The copy and the transpose-only fusion.
  assert move['bytes'] == 2 * 4 + 2 * 32 * 4
  assert r['kernels'] == 8 and not r['notes']


def test_unknown_trip_count_counts_once_with_a_note():
  r = _analyze(LOOP.replace(', backend_config={"known_trip_count":{"n":"5"}}', ''))
  assert r['by_category']['elementwise/reduction fusions']['count'] == 2
  assert any('trip count' in n for n in r['notes'])


def test_bound_is_max_of_compute_and_memory_per_kernel():
  # A conv and an add; at these rates the conv is compute-bound, the add memory-bound.
  text = LOOP.split('%fused_transpose')[0] + CONVS.split('\n', 1)[1].replace(
      '  ROOT %bitcast.5',
      '  %b.2 = f32[8]{0} parameter(3)\n'
      '  %add.2 = f32[4,8]{1,0} fusion(%x.2, %b.2), kind=kLoop, calls=%fused_add\n'
      '  %x.2 = f32[4,8]{1,0} parameter(4)\n'
      '  ROOT %bitcast.5',
  )
  peak, bw = 1e6, 1e6
  conv_bytes = 3 * (8 * 9 * 4 * 2 + 2 * 8 * 8 * 8 * 2) + 2 * 2 * 8 * 8 * 4 * 2 + 2 * 17 * 17 * 4 * 2
  assert CONV_FLOPS / peak > conv_bytes / bw  # Even for the three together.
  r = hlo_roofline.analyze(text, peak_flops=peak, hbm_bytes_per_s=bw)
  assert r['kernels'] == 4
  assert r['compute_bound_s'] == pytest.approx(3 * CONV_FLOPS / peak)
  assert r['memory_bound_s'] == pytest.approx(ADD_BYTES / bw)
  assert r['lower_bound_s'] == pytest.approx(3 * CONV_FLOPS / peak + ADD_BYTES / bw)
  assert r['by_category']['conv']['share'] == pytest.approx(
      3 * CONV_FLOPS / peak / r['lower_bound_s']
  )
  # With compute free, every kernel is bound by its bytes.
  r = hlo_roofline.analyze(text, peak_flops=1e30, hbm_bytes_per_s=bw)
  assert r['compute_bound_s'] == 0
  assert r['lower_bound_s'] == pytest.approx((conv_bytes + ADD_BYTES) / bw)


# The fused q/k/v matmul's output split by three fusions, each slicing its third
# (and one fusion that also reads the whole of it, which counts whole).
SLICED = """HloModule m

%fused_q (param_0.1: bf16[64,24], param_1.1: bf16[8]) -> bf16[64,8] {
  %param_0.1 = bf16[64,24]{1,0} parameter(0)
  %slice.1 = bf16[64,8]{1,0} slice(%param_0.1), slice={[0:64], [0:8]}
  %param_1.1 = bf16[8]{0} parameter(1)
  %broadcast.1 = bf16[64,8]{1,0} broadcast(%param_1.1), dimensions={1}
  ROOT %add.1 = bf16[64,8]{1,0} add(%slice.1, %broadcast.1)
}

%fused_k (param_0.2: bf16[64,24]) -> bf16[64,8] {
  %param_0.2 = bf16[64,24]{1,0} parameter(0)
  %slice.2 = bf16[64,8]{1,0} slice(%param_0.2), slice={[0:64], [8:16]}
  %slice.3 = bf16[64,8]{1,0} slice(%param_0.2), slice={[0:64], [16:24]}
  ROOT %add.2 = bf16[64,8]{1,0} add(%slice.2, %slice.3)
}

%fused_v (param_0.3: bf16[64,24]) -> bf16[64,24] {
  %param_0.3 = bf16[64,24]{1,0} parameter(0)
  %slice.4 = bf16[64,24]{1,0} slice(%param_0.3), slice={[0:64], [0:24]}
  ROOT %add.3 = bf16[64,24]{1,0} add(%slice.4, %param_0.3)
}

ENTRY %main (qkv: bf16[64,24], b: bf16[8]) -> bf16[64,8] {
  %qkv = bf16[64,24]{1,0} parameter(0)
  %b = bf16[8]{0} parameter(1)
  %q = bf16[64,8]{1,0} fusion(%qkv, %b), kind=kLoop, calls=%fused_q
  %k = bf16[64,8]{1,0} fusion(%qkv), kind=kLoop, calls=%fused_k
  %v = bf16[64,24]{1,0} fusion(%qkv), kind=kLoop, calls=%fused_v
  ROOT %t = (bf16[64,8]{1,0}, bf16[64,8]{1,0}, bf16[64,24]{1,0}) tuple(%q, %k, %v)
}
"""


def test_a_fusion_operand_read_only_through_slices_counts_the_slices():
  kernels = {k['name']: k['bytes'] for k in _analyze(SLICED)['top_kernels']}
  third, whole = 64 * 8 * 2, 64 * 24 * 2
  assert kernels['q'] == third + 8 * 2 + third  # its slice, the bias, its output
  assert kernels['k'] == 2 * third + third  # two slices, the output
  assert kernels['v'] == whole + whole  # read whole (not only sliced), the output


def test_unknown_ops_and_garbage_lines_do_not_crash():
  text = LOOP.replace(
      '  %copy.1 = s32[] copy(%n.1)',
      '  %copy.1 = s32[] copy(%n.1)\n'
      '  this line is not HLO\n'
      '  %sort.1 = f32[4,8]{1,0} sort(%x.1), dimensions={1}, to_apply=%cond\n'
      '  %cc.1 = f32[8]{0} custom-call(%b.1, %nowhere), custom_call_target="MyKernel"',
  )
  r = _analyze(text)
  assert r['skipped'] == 1
  other = r['by_category']['other']
  assert other['count'] == 2 and other['flops'] == 0
  assert other['bytes'] == 2 * 32 * 4 + 2 * 8 * 4  # The unknown operand counts 0.
  assert _analyze('not hlo at all')['kernels'] == 0


def test_report_and_cli(tmp_path, capsys):
  r = _analyze(CONVS, peak_flops=1e9, hbm_bytes_per_s=1e6)
  table = hlo_roofline.format_report(r, model_flops=2 * CONV_FLOPS)
  assert '| conv | 3 |' in table
  assert hlo_roofline.mfu_ceiling(r, 2 * CONV_FLOPS) == pytest.approx(
      2 * CONV_FLOPS / (r['lower_bound_s'] * 1e9)
  )
  path = tmp_path / 'step.hlo.txt'
  path.write_text(GEMM)
  flag_values = flags.FlagValues()
  hlo_roofline.define_flags(flag_values)
  # Positional files and flags interleave; '--flag value' and '--flag=value' both parse.
  argv = flag_values(['hlo_roofline', str(path), '--peak_tflops', '1', '--model_flops=1e4'])
  hlo_roofline.main(argv, flag_values)
  out = capsys.readouterr().out
  expected = hlo_roofline.format_report(
      _analyze(GEMM, peak_flops=1e12, hbm_bytes_per_s=3.35e12), model_flops=1e4
  )
  assert '| gemm | 1 |' in out and 'roofline MFU ceiling' in out
  assert out == f'## {path}\n\n{expected}\n\n'  # The flags' values reached analyze().
  with pytest.raises(app.UsageError, match='FILE'):
    hlo_roofline.main(['hlo_roofline'], flag_values)
