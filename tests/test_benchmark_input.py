"""ddep.tools.benchmark_input runs on tiny synthetic data and reports sane rates."""

import pytest

from ddep.tools import benchmark_input as bi


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('bench'))
  # 20 x 27 JPEGs: a side that is not a multiple of 8 (labels must still match the image).
  return bi.synthetic_spec(data_dir, (20, 27), 'jpeg', num_images=4), data_dir


@pytest.mark.parametrize('which', ['pretrain', 'finetune'])
def test_measure_reports_positive_rates(data, which):
  spec, data_dir = data
  r = bi.measure(
      spec,
      which,
      data_dir=data_dir,
      batch_size=2,
      batches=2,
      warmup=1,
      image_size=(8, 8),
      crop=(16, 16),
  )
  assert r['pipeline'] == which and r['size'] == ([8, 8] if which == 'pretrain' else [16, 16])
  assert r['cores'] >= 1 and r['images_per_s'] > 0 and r['images_per_cpu_s'] > 0
  assert r['images_per_s_per_core'] == pytest.approx(r['images_per_s'] / r['cores'])
