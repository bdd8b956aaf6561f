"""ddep.prepare's command: flags parsed by absl, TFDS's bars replaced by ddep.runs.progress lines."""

from absl import flags
from tensorflow_datasets.core import utils as tfds_utils

from ddep import prepare


def run(*argv):
  flag_values = flags.FlagValues()
  prepare.define_flags(flag_values)
  return prepare.main(flag_values(['ddep.prepare', *argv]), flag_values)


def test_demo_build_prints_plain_progress_lines(tmp_path, capsys):
  original = tfds_utils.tqdm
  assert run('--dataset=demo_tiny', '--data_dir', str(tmp_path)) == 0
  out = capsys.readouterr().out
  assert tfds_utils.tqdm is original  # Restored after the build.
  # One summary line per split from ddep.runs.progress, no carriage-return bar.
  assert '[ddep] prepare demo_tiny train ' in out and ' examples in ' in out, out
  assert '[ddep] prepare demo_tiny validation ' in out and '\r' not in out
  assert 'ddep.prepare: ' in out and f'--config.data.data_dir={tmp_path}' in out


def test_other_tfds_bars_are_silent(capsys):
  with prepare.plain_progress('x'):
    assert list(tfds_utils.tqdm([1, 2], desc='Shuffling...', unit=' examples')) == [1, 2]
    assert list(tfds_utils.tqdm(iter([3]), desc='Generating test examples...', total=None)) == [3]
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 1 and lines[0].startswith('[ddep] prepare x test 1 examples in 0s, ')
