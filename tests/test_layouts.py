"""A donating step with its state in layouts other than the default ones.

XLA:CPU picks the default layouts for `Layout.AUTO`, so the tests fix a non-default one
(the reversed axis order) for every leaf: the paths that a GPU's chosen layouts take then
run here. A whole run in such layouts (placed, saved, killed, restored, evaluated) is in
test_multihost.py, next to the run it must equal.
"""

import jax
from jax.experimental.layout import Layout
import numpy as np
import pytest

from ddep.training import compiled
from ddep.training import layouts


def reversed_axes(leaf):
  """Every leaf fixed (XLA:CPU overrides fixed output layouts when AUTO ones are among
  them), in the reverse of the default axis order."""
  return Layout(major_to_minor=tuple(reversed(range(leaf.ndim))))


@pytest.fixture
def reversed_layouts(monkeypatch):
  compiled.clear()  # No step compiled for the default layouts may be reused,
  monkeypatch.setattr(layouts, 'preferred_layout', reversed_axes)
  yield
  compiled.clear()  # nor this one after.


def _step(state, batch):
  w, b, x = state['w'], state['b'], batch['x']
  loss = jax.numpy.mean((x @ w + b) ** 2)
  gw, gb = jax.grad(lambda w, b: jax.numpy.mean((x @ w + b) ** 2), argnums=(0, 1))(w, b)
  return {'w': w - 0.1 * gw, 'b': b - 0.1 * gb}, loss


def test_the_step_reads_and_writes_its_state_in_the_layouts_it_was_compiled_for(reversed_layouts):
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  rng = np.random.default_rng(0)
  w, b = rng.normal(size=(3, 5)).astype(np.float32), np.zeros(5, np.float32)
  batch = {'x': jax.device_put(rng.normal(size=(4, 3)).astype(np.float32), one)}
  state = jax.device_put({'w': w, 'b': b}, one)
  step = layouts.DonatingStep(_step, {'w': one, 'b': one}, one, one)

  with pytest.raises(ValueError, match='layout'):  # Not placed: refused, not misread.
    step(jax.device_put({'w': w, 'b': b}, one), batch)
  state = step.place(state, batch)
  assert state['w'].format.layout.major_to_minor == (1, 0)
  assert step.place(state, batch) is state  # Already there: no copy.
  expected = {'w': w, 'b': b}
  for _ in range(3):
    state, loss = step(state, batch)
    expected, expected_loss = jax.jit(_step)(expected, batch)
    assert state['w'].format.layout.major_to_minor == (1, 0)  # Stays, so no relayout.
    np.testing.assert_allclose(float(loss), float(expected_loss), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(state['w']), np.asarray(expected['w']), rtol=1e-6)


def test_default_layouts_compile_the_state_row_major_and_a_typo_is_refused(reversed_layouts):
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  state = jax.device_put({'w': np.ones((3, 5), np.float32), 'b': np.zeros(5, np.float32)}, one)
  batch = {'x': jax.device_put(np.ones((4, 3), np.float32), one)}
  step = layouts.DonatingStep(_step, {'w': one, 'b': one}, one, one, layouts='default')
  assert step.place(state, batch) is state  # preferred_layout is not asked.
  state, _ = step(state, batch)
  assert state['w'].format.layout.major_to_minor == (0, 1)
  with pytest.raises(ValueError, match="layouts: 'tiled' is not one of"):
    layouts.DonatingStep(_step, {'w': one, 'b': one}, one, one, layouts='tiled')


def test_a_state_returned_in_other_layouts_than_donated_is_compiled_again_to_match(
    reversed_layouts, monkeypatch
):
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  state = jax.device_put({'w': np.ones((3, 5), np.float32), 'b': np.zeros(5, np.float32)}, one)
  batch = {'x': jax.device_put(np.ones((4, 3), np.float32), one)}
  step = layouts.DonatingStep(_step, {'w': one, 'b': one}, one, one)
  reversed_exe = step.lower(state, batch).compile()
  row_major = layouts.DonatingStep(_step, {'w': one, 'b': one}, one, one, layouts='default')
  default_out = row_major.lower(state, batch).compile().output_formats

  class Mismatched:  # What XLA would hand back had it laid the returned state out apart.
    input_formats, output_formats = reversed_exe.input_formats, default_out

    def compile(self):
      return self

  lower = layouts.DonatingStep.lower

  def first_lowering_mismatched(self, state, batch, formats=None):
    return lower(self, state, batch, formats=formats) if formats else Mismatched()

  monkeypatch.setattr(layouts.DonatingStep, 'lower', first_lowering_mismatched)
  executable, formats = step.compile(state, batch)
  assert formats['w'].layout.major_to_minor == (1, 0)
  assert executable.output_formats[0]['w'].layout.major_to_minor == (1, 0)  # Recompiled.
  state, _ = step(step.place(state, batch), batch)
  assert state['w'].format.layout.major_to_minor == (1, 0)
