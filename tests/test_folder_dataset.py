"""Your own images (issue 23): a generated folder prepared by `ddep.prepare --dataset=folder:NAME`,
then pretrained, fine-tuned, evaluated and predicted on with the user's commands; every kind
of bad input named by prepare; the pure helpers of the classes file and the masks.

The folder is made here, so its true ids are known: what TFDS stores is checked against
them, not against ddep's own reading of the files. One folder is prepared for the module;
the bad-input cases prepare small folders of their own, in process (the CLI's main with
its own flags, as tests/test_prepare.py does).
"""

import hashlib
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from absl import flags
import numpy as np
from PIL import Image
import pytest

from ddep import prepare
from ddep.config import validation as config_validation
from ddep.datasets import folder
from ddep.datasets import folder_labels
from ddep.datasets import specs

REPO = Path(__file__).resolve().parents[1]
NAME = 'mine'
DATASET = f'folder:{NAME}'
CLASSES = ('background', 'road', 'tree')
PALETTE = np.array([[0, 0, 0], [128, 64, 128], [30, 200, 30]], np.uint8)
IGNORE_COLOUR = (255, 255, 255)
# 'road' as three integers, 'tree' as #rrggbb; a comment, a blank line, the ignore colour.
CLASSES_FILE = (
    '# name colour\nbackground 0 0 0\n\nroad 128 64 128\ntree #1ec81e\nignore 255 255 255\n'
)
# 0.4 puts 4 of the 12 names in validation (one of each mask format), leaving 8 to train.
NUM_LABELLED, NUM_UNLABELLED, VAL_FRACTION, COUNT = 12, 8, 0.4, 4


def run_prepare(*argv):
  """`python -m ddep.prepare ARGV` in process: (exit code, stdout, stderr) through capfd."""
  flag_values = flags.FlagValues()
  prepare.define_flags(flag_values)
  return prepare.main(flag_values(['ddep.prepare', *argv]), flag_values)


def _errors(capfd) -> list[str]:
  """ddep.prepare's error lines (absl may log TFDS's warnings to stderr too)."""
  return [l for l in capfd.readouterr().err.splitlines() if l.startswith('ddep.prepare: error')]


def folder_args(root, data_dir, *extra):
  return (
      f'--dataset={DATASET}',
      f'--images={root / "images"}',
      f'--masks={root / "masks"}',
      f'--classes={root / "classes.txt"}',
      f'--data_dir={data_dir}',
      *extra,
  )


def draw_ids(rng, h, w):
  """Train ids with every class and a few ignored pixels."""
  ids = np.zeros((h, w), np.uint8)
  ids[h // 3 :, : w // 2] = 1
  ids[: h // 4, w // 2 :] = 2
  ids[rng.integers(0, h, 3), rng.integers(0, w, 3)] = 255
  return ids


def save_mask(path, ids, kind):
  """`ids` as the user's mask: 'ids' (L), 'palette' (P with the classes' colours, 255 ->
  the ignore colour) or 'rgb' (the colours themselves)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  if kind == 'ids':
    Image.fromarray(ids, 'L').save(path)
    return
  colours = np.zeros((256, 3), np.uint8)
  colours[: len(CLASSES)] = PALETTE
  colours[255] = IGNORE_COLOUR
  if kind == 'palette':
    mask = Image.fromarray(ids, 'P')
    mask.putpalette(colours.ravel().tolist())
    mask.save(path)
  else:
    Image.fromarray(colours[ids], 'RGB').save(path)


def save_image(path, pixels):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(pixels).save(path)


def make_folder(root, *, num_labelled=NUM_LABELLED, num_unlabelled=NUM_UNLABELLED, seed=0):
  """A user's folder: {image id: true train ids}. Mixed JPEG/PNG of 24-48 px in nested
  folders, a greyscale image, masks as ids, palette PNGs and RGB colours."""
  rng = np.random.default_rng(seed)
  truth = {}
  for i in range(num_labelled):
    h, w = (int(v) for v in rng.integers(24, 49, 2))
    image_id = f'{["city", "city/north", "fields"][i % 3]}/img{i:02d}'
    suffix = '.jpg' if i % 2 else '.png'
    pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    save_image(root / 'images' / f'{image_id}{suffix}', pixels[..., 0] if i == 3 else pixels)
    truth[image_id] = draw_ids(rng, h, w)
    save_mask(root / 'masks' / f'{image_id}.png', truth[image_id], ['ids', 'palette', 'rgb'][i % 3])
  for i in range(num_unlabelled):
    pixels = rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)
    save_image(root / 'unlabelled' / f'batch{i % 2}' / f'u{i}.jpg', pixels)
  (root / 'classes.txt').write_text(CLASSES_FILE)
  return truth


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  """(root, data_dir, truth, stdout of ddep.prepare) of the module's one prepared folder."""
  root = tmp_path_factory.mktemp('folder')
  truth = make_folder(root)
  data_dir = root / 'tfds'
  flag_values = flags.FlagValues()
  prepare.define_flags(flag_values)
  argv = folder_args(
      root, data_dir, f'--unlabelled={root / "unlabelled"}', f'--val_fraction={VAL_FRACTION}'
  )
  out = io.StringIO()
  stdout, sys.stdout = sys.stdout, out
  try:
    code = prepare.main(flag_values(['ddep.prepare', *argv]), flag_values)
  finally:
    sys.stdout = stdout
  assert code == 0, out.getvalue()
  return root, data_dir, truth, out.getvalue()


def _cli(module, *argv, timeout=300):
  proc = subprocess.run(
      [sys.executable, '-m', module, *argv],
      cwd=REPO,
      env=dict(os.environ, JAX_PLATFORMS='cpu'),
      capture_output=True,
      text=True,
      timeout=timeout,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


@pytest.fixture(scope='module')
def pretrained(prepared, tmp_path_factory):
  """The workdir of 2 DeP steps on the folder: configs/pretrain_folder.py at runlocal."""
  _, data_dir, _, _ = prepared
  workdir = tmp_path_factory.mktemp('dep')
  _cli(
      'ddep.main',
      f'--config=configs/pretrain_folder.py:name={NAME},method=dep,runlocal=1',
      '--config.total_steps=2',
      f'--config.data.data_dir={data_dir}',
      f'--workdir={workdir}',
  )
  return workdir


@pytest.fixture(scope='module')
def finetuned(prepared, pretrained, tmp_path_factory):
  """The workdir of 2 fine-tuning steps on COUNT labelled images, from the DeP run."""
  _, data_dir, _, _ = prepared
  workdir = tmp_path_factory.mktemp('finetune')
  _cli(
      'ddep.main',
      f'--config=configs/finetune_folder.py:name={NAME},method=dep,count={COUNT},'
      f'init_from={pretrained},runlocal=1',
      '--config.total_steps=2',
      f'--config.data.data_dir={data_dir}',
      f'--workdir={workdir}',
  )
  return workdir


# --- prepare: what is stored ---------------------------------------------------------------


def _read_split(data_dir, tfds_name, split):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (TF: import late)

  builder = tfds.builder(tfds_name, data_dir=str(data_dir))
  return {ex['image_id'].decode(): ex for ex in tfds.as_numpy(builder.as_dataset(split=split))}


def test_prepare_stores_every_image_with_its_true_ids(prepared):
  root, data_dir, truth, out = prepared
  # Chosen by the hash of each name, computed here independently of ddep.datasets.folder.
  digest = lambda name: int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], 'big')
  validation = {i for i in truth if digest(i) < VAL_FRACTION * 2**64}
  stored = {
      split: _read_split(data_dir, folder.tfds_name(DATASET), split)
      for split in ('train', 'validation')
  }
  assert set(stored['validation']) == validation and validation
  assert set(stored['train']) == set(truth) - validation
  for examples in stored.values():
    for image_id, ex in examples.items():
      # Ids, palette and RGB masks all come out as the ids they were drawn from.
      np.testing.assert_array_equal(ex['segmentation'][..., 0], truth[image_id])
      assert ex['image'].shape == truth[image_id].shape + (3,)
      present = sorted(set(np.unique(truth[image_id])) - {255})
      assert np.flatnonzero(ex['labels']).tolist() == present  # image-level labels
  grey = stored['train'].get('city/img03', stored['validation'].get('city/img03'))
  assert (grey['image'][..., 0] == grey['image'][..., 2]).all()  # stored as RGB
  pretraining = {
      split: _read_split(data_dir, folder.images_tfds_name(DATASET), split)
      for split in ('unlabelled', 'train')
  }
  assert len(pretraining['unlabelled']) == NUM_UNLABELLED
  assert 'batch1/u3' in pretraining['unlabelled']
  assert set(pretraining['train']) == set(stored['train'])  # labelled images pretrain too
  n_train, n_val = len(stored['train']), len(stored['validation'])
  assert f'{DATASET} ready under {data_dir}: 3 classes; train {n_train}, validation {n_val}' in out
  assert f'pretraining on unlabelled {NUM_UNLABELLED}, train {n_train}' in out


def test_spec_carries_class_names_and_palette_to_any_config(prepared):
  _, data_dir, _, _ = prepared
  spec = specs.get(DATASET, data_dir=str(data_dir))
  assert spec.class_names == CLASSES and spec.num_classes == 3
  np.testing.assert_array_equal(spec.palette, PALETTE)
  assert spec.pretrain_splits == ('unlabelled', 'train') and spec.image_labels_key == 'labels'
  assert specs.get(DATASET) is spec  # what the rest of a run gets after validation

  from configs import supervised_demo  # pylint: disable=g-import-not-at-top

  # Any config takes it, here supervised encoder pretraining on the masks' image labels.
  c = supervised_demo.get_config('runlocal')
  c.data.dataset, c.data.data_dir = DATASET, str(data_dir)
  config_validation.validate(c)
  c.data.data_dir = str(data_dir / 'elsewhere')
  with pytest.raises(config_validation.ConfigError) as e:
    config_validation.validate(c)
  message = str(e.value)
  assert '\n' not in message and message.startswith(f'config.data.dataset: {DATASET} is not')
  assert f'python -m ddep.prepare --dataset={DATASET} --images=DIR' in message


def test_prepare_again_reuses_the_same_inputs_and_rebuilds_changed_ones(tmp_path, capfd):
  truth = make_folder(tmp_path, num_labelled=4, num_unlabelled=0, seed=1)
  data_dir = tmp_path / 'tfds'
  args = folder_args(tmp_path, data_dir, '--val_fraction=0.5')
  assert run_prepare(*args) == 0
  assert run_prepare(*args) == 0
  assert 'unchanged since its last preparation; reused' in capfd.readouterr().out
  # A fixed mask (same name, new content) is read again: nothing stale survives.
  image_id = sorted(truth)[0]
  changed = np.full_like(truth[image_id], 2)
  save_mask(tmp_path / 'masks' / f'{image_id}.png', changed, 'ids')
  os.utime(tmp_path / 'masks' / f'{image_id}.png', (1, 1))  # a different mtime, surely
  assert run_prepare(*args) == 0
  assert 'reused' not in capfd.readouterr().out
  meta = folder.read_metadata(DATASET, str(data_dir))
  split = 'validation' if folder.in_validation(image_id, 0.5) else 'train'
  ex = _read_split(data_dir, folder.tfds_name(DATASET), split)[image_id]
  np.testing.assert_array_equal(ex['segmentation'][..., 0], changed)
  assert meta['pretrain_splits'] == ['train'] and not meta['images_builder']


# --- prepare: bad input, one line naming the file; nothing half-written ---------------------


def _corrupt(root, case):
  """Breaks a fresh 4-image folder as `case` says; returns the file the error must name."""
  masks, images = root / 'masks', root / 'images'
  first = sorted(masks.rglob('*.png'))[0]
  if case == 'mask without image':
    extra = masks / 'fields' / 'lost.png'
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(extra)
    return extra
  if case == 'image without mask':
    extra = images / 'city' / 'alone.png'
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(extra)
    return extra
  if case == 'mask size':
    Image.fromarray(np.zeros((5, 7), np.uint8)).save(first)
    return first
  if case == 'class id':
    Image.fromarray(np.full(Image.open(first).size[::-1], 7, np.uint8)).save(first)
    return first
  if case == 'colour':
    size = Image.open(first).size[::-1]
    Image.fromarray(np.full(size + (3,), 99, np.uint8), 'RGB').save(first)
    return first
  if case == 'truncated jpeg':
    jpeg = sorted(images.rglob('*.jpg'))[0]
    jpeg.write_bytes(jpeg.read_bytes()[: len(jpeg.read_bytes()) // 2])
    return jpeg
  if case == 'unreadable png':
    png = sorted(images.rglob('*.png'))[0]
    png.write_bytes(b'not an image')
    return png
  raise ValueError(case)


BAD_FILES = (
    ('mask without image', 'mask has no image'),
    ('image without mask', 'image has no mask'),
    ('mask size', 'mask size 7x5 != image size'),
    ('class id', 'class id(s) 7'),
    ('colour', 'colour(s) (99, 99, 99)'),
    ('truncated jpeg', 'cannot be read in full'),
    ('unreadable png', 'cannot be read in full'),
)


@pytest.mark.parametrize('case,message', BAD_FILES, ids=[c for c, _ in BAD_FILES])
def test_bad_file_is_one_line_naming_it_or_skipped_with_skip_bad(tmp_path, capfd, case, message):
  make_folder(tmp_path, num_labelled=4, num_unlabelled=0, seed=2)
  bad = _corrupt(tmp_path, case)
  data_dir = tmp_path / 'tfds'
  args = folder_args(tmp_path, data_dir, '--val_fraction=0.5')
  assert run_prepare(*args) == 1
  err = _errors(capfd)
  assert len(err) == 1 and err[0].startswith(f'ddep.prepare: error: {bad}: '), err
  assert message in err[0]
  # Nothing a run could read: no metadata, so config validation says "not prepared".
  assert folder.read_metadata(DATASET, str(data_dir)) is None
  with pytest.raises(folder.NotPreparedError):
    folder.load_spec(DATASET, str(data_dir))

  # --skip_bad leaves the file out, names it, and prepares the rest.
  assert run_prepare(*args, '--skip_bad') == 0
  skipped = [l for l in capfd.readouterr().out.splitlines() if l.startswith('ddep.prepare: skip')]
  assert len(skipped) == 1 and skipped[0].startswith(f'ddep.prepare: skipped {bad}: ')
  assert message in skipped[0]
  meta = folder.read_metadata(DATASET, str(data_dir))
  assert [s[0] for s in meta['skipped']] == [str(bad)]


@pytest.mark.parametrize(
    'text,message',
    [
        ('road 1 2 3\ntree\nroad 4 5 6\n', "line 3: class 'road' is on line 1 already"),
        ('road 1 2 3\ntree #010203\n', 'line 2: colour (1, 2, 3) is the colour of line 1'),
        ('# nothing\n\n', 'no classes'),
        ('road 1 2 3\ntree\n', "class 'tree' (line 2) has no colour"),
    ],
)
def test_bad_classes_file_is_named(tmp_path, capfd, text, message):
  make_folder(tmp_path, num_labelled=2, num_unlabelled=0, seed=3)
  (tmp_path / 'classes.txt').write_text(text)
  assert run_prepare(*folder_args(tmp_path, tmp_path / 'tfds', '--val_fraction=0.5')) == 1
  err = _errors(capfd)
  assert err == [f'ddep.prepare: error: --classes={tmp_path / "classes.txt"}: {message}'] or (
      len(err) == 1
      and err[0].startswith(f'ddep.prepare: error: --classes={tmp_path / "classes.txt"}: ')
      and message in err[0]
  ), err


def test_empty_folders_and_flags_that_go_together(tmp_path, capfd):
  make_folder(tmp_path, num_labelled=4, num_unlabelled=0, seed=4)
  (tmp_path / 'empty').mkdir()
  for suffix in ('.jpg', '.png'):  # one image id, twice
    save_image(tmp_path / 'twice' / f'a{suffix}', np.zeros((4, 4, 3), np.uint8))
  data_dir = tmp_path / 'tfds'
  cases = [
      (
          folder_args(tmp_path, data_dir, '--val_fraction=0.5', f'--unlabelled={tmp_path}/empty'),
          f'--unlabelled={tmp_path}/empty holds no',
      ),
      (
          (f'--dataset={DATASET}', f'--images={tmp_path / "empty"}', f'--masks={tmp_path}')
          + (f'--classes={tmp_path / "classes.txt"}',),
          f'--images={tmp_path / "empty"} holds no .jpg/.jpeg/.png file',
      ),
      (folder_args(tmp_path, data_dir, f'--val_images={tmp_path}'), 'go together'),
      (
          folder_args(tmp_path, data_dir, '--val_fraction=0.5', f'--unlabelled={tmp_path}/twice'),
          'rename one',
      ),
      (folder_args(tmp_path, data_dir, '--nopretrain_on_labelled'), 'pass --unlabelled=DIR'),
      ((f'--dataset={DATASET}', f'--images={tmp_path}'), 'needs --masks, --classes'),
      (('--dataset=folder:a/b', '--images=x', '--masks=y', '--classes=z'), 'NAME of letters'),
  ]
  for argv, message in cases:
    assert run_prepare(*argv) == 1, argv
    err = _errors(capfd)
    assert len(err) == 1 and message in err[0], (message, err)


# --- the classes file and masks, unit by unit --------------------------------------------


def test_parse_classes_names_colours_and_ignore():
  classes = folder_labels.parse_classes(CLASSES_FILE)
  assert classes.names == CLASSES and classes.ignore_colour == IGNORE_COLOUR
  np.testing.assert_array_equal(classes.colours, PALETTE)
  plain = folder_labels.parse_classes('sky\nchest of drawers\n')
  assert plain.names == ('sky', 'chest of drawers') and plain.colours is None


def test_mask_ids_by_mode_and_reduce_zero_label():
  classes = folder_labels.parse_classes(CLASSES_FILE)
  ids = np.array([[0, 1, 2, 255]], np.uint8)
  for kind in ('palette', 'rgb'):
    buffer = io.BytesIO()
    colours = np.zeros((256, 3), np.uint8)
    colours[:3], colours[255] = PALETTE, IGNORE_COLOUR
    mask = Image.fromarray(colours[ids], 'RGB')
    if kind == 'palette':
      mask = Image.fromarray(ids, 'P')
      mask.putpalette(colours.ravel().tolist())
    mask.save(buffer, format='PNG')
    read = folder_labels.mask_ids(Image.open(buffer), classes)
    np.testing.assert_array_equal(read, ids)
  # ADE20K's convention: 0 is "other", id k is line k - 1; 255 stays ignored.
  raw = Image.fromarray(np.array([[0, 1, 3, 255]], np.uint8), 'L')
  reduced = folder_labels.mask_ids(raw, classes, reduce_zero_label=True)
  np.testing.assert_array_equal(reduced, [[255, 0, 2, 255]])
  with pytest.raises(folder_labels.LabelError, match=r'class id\(s\) 4 '):
    folder_labels.mask_ids(
        Image.fromarray(np.array([[4]], np.uint8)), classes, reduce_zero_label=True
    )
  # Without colours in the classes file, a palette PNG's indices are the ids (as VOC's).
  no_colours = folder_labels.parse_classes('a\nb\nc\n')
  voc = Image.fromarray(np.array([[2, 255]], np.uint8), 'P')
  np.testing.assert_array_equal(folder_labels.mask_ids(voc, no_colours), [[2, 255]])
  with pytest.raises(folder_labels.LabelError, match='lists no colours'):
    folder_labels.mask_ids(Image.new('RGB', (2, 2)), no_colours)


def test_validation_is_a_stable_hash_of_the_name():
  names = [f'dir{i % 7}/img{i}' for i in range(4000)]
  chosen = [n for n in names if folder.in_validation(n, 0.1)]
  assert 0.08 < len(chosen) / len(names) < 0.12
  assert chosen == [n for n in reversed(names) if folder.in_validation(n, 0.1)][::-1]
  assert set(chosen) <= {n for n in names if folder.in_validation(n, 0.3)}  # nested fractions


# --- the user's commands: pretrain, fine-tune, evaluate, predict ---------------------------


def _rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_dep_pretraining_on_the_folder(pretrained):
  losses = [r['train/loss'] for r in _rows(pretrained) if 'train/loss' in r]
  assert len(losses) == 2 and all(math.isfinite(v) and v > 0 for v in losses)
  psnr = [r['val/psnr'] for r in _rows(pretrained) if 'val/psnr' in r]
  assert psnr and all(math.isfinite(v) for v in psnr)  # held out on the validation images
  with open(os.path.join(pretrained, 'config.json')) as f:
    config = json.load(f)
  assert (config['data']['dataset'], config['task'], config['method']) == (
      DATASET,
      'denoise',
      'dep',
  )


def test_finetuning_at_a_label_count_from_the_dep_run(finetuned, pretrained):
  with open(os.path.join(finetuned, 'results.json')) as f:
    results = json.load(f)
  assert results['dataset'] == DATASET and results['label_count'] == COUNT
  assert results['pretraining']['workdir'] == str(pretrained)
  with open(os.path.join(finetuned, 'subset_ids.txt')) as f:
    assert len(f.read().split()) == COUNT  # the label count honoured
  assert list(results['per_class_iou']) == list(CLASSES)
  assert 0 <= results['miou'] <= 1 and math.isfinite(results['miou'])


def test_evaluate_and_predict_name_the_folder_classes(prepared, finetuned, tmp_path):
  root, _, _, _ = prepared
  proc = _cli('ddep.evaluate', f'--workdir={finetuned}')
  saved = json.loads(Path(finetuned, 'best', '2', 'eval_validation_whole.json').read_text())
  assert list(saved['per_class_iou']) == list(CLASSES) and math.isfinite(saved['miou'])
  assert all(name in proc.stdout for name in CLASSES)  # the per-class IoU table

  output = tmp_path / 'predictions'
  _cli(
      'ddep.predict',
      f'--workdir={finetuned}',
      f'--images={root / "unlabelled"}',
      f'--output={output}',
  )
  for image in sorted((root / 'unlabelled').rglob('*.jpg')):
    rel = image.relative_to(root / 'unlabelled').with_suffix('.png')
    labels = np.asarray(Image.open(output / 'labels' / rel))
    overlay = np.asarray(Image.open(output / 'overlays' / rel))
    assert labels.shape == (32, 40) and set(np.unique(labels)) <= set(range(len(CLASSES)))
    assert overlay.shape == (32, 40, 3)
