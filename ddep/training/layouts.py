"""A donating train step whose state lives in the memory layouts XLA picks for it.

With the state in the default (row-major) layouts, XLA:GPU cannot update a convolution
kernel in place: cuDNN returns the kernel's gradient in its own filter layout, so the
kernel's Adam update is a transposing fusion, and the new kernel and both moments are
copied into their donated buffers afterwards. Compiling the step with `Layout.AUTO` for
the state lets XLA store those leaves in the layout it computes them in. On a described
H100 (deviceless compile, docs/performance.md) the DeP step goes from 2,792 to 2,541
kernels (of which copies: 201 to 2) and from 124.5 to 123.3 GB of HBM traffic. On the CPU
XLA picks the default layouts, so the state and the program are unchanged there.

A layout is how an array sits in device memory, not what it holds: `np.asarray`, orbax
and every other jitted function read such an array as they would any other.
"""

from typing import Any, Callable

from absl import logging
import jax
from jax.experimental.layout import Format
from jax.experimental.layout import Layout

from ddep.training import sharding

# 'auto': the layouts XLA picks; 'default': row-major, as every array outside the step (a
# way back, should a platform mishandle the chosen ones, and the benchmark's baseline).
LAYOUTS = ('auto', 'default')


def preferred_layout(leaf: jax.ShapeDtypeStruct) -> Any:
  """What the step is compiled with for one state leaf: XLA's choice. (Tests put a
  fixed non-default layout here to run the rest of the trainer on one.)"""
  del leaf
  return Layout.AUTO


def _signature(batch) -> tuple:
  leaves, treedef = jax.tree.flatten(batch)
  return treedef, tuple((x.shape, x.dtype) for x in leaves)


class DonatingStep:
  """`fn(state, batch) -> (state, out)` compiled once per batch signature, the state donated.

  Call `place(state, batch)` on a state that did not come out of this step (a new or
  restored one) before stepping it: it compiles the step for `batch` if needed and
  returns the state in the layouts that program reads and writes.
  """

  def __init__(
      self, fn: Callable, state_shardings, batch_sharding, out_sharding, *, layouts: str = 'auto'
  ):
    if layouts not in LAYOUTS:
      raise ValueError(f'layouts: {layouts!r} is not one of {LAYOUTS}')
    self._fn = fn
    self._auto = layouts == 'auto'
    self._state_shardings = state_shardings
    self._batch_sharding = batch_sharding
    self._out_sharding = out_sharding
    self._compiled = {}  # batch signature -> (executable, the state's formats)

  def lower(self, state, batch, *, formats=None) -> jax.stages.Lowered:
    """The step lowered for `state`'s shapes (arrays or ShapeDtypeStructs) and `batch`,
    its state in and out in `formats` (by default as the constructor's `layouts` say)."""
    abstract = sharding.abstract(state, self._state_shardings)
    if formats is None:
      formats = self._state_shardings
      if self._auto:
        formats = jax.tree.map(
            lambda x, s: Format(preferred_layout(x), s), abstract, self._state_shardings
        )
    jitted = jax.jit(
        self._fn,
        in_shardings=(formats, self._batch_sharding),
        out_shardings=(formats, self._out_sharding),
        donate_argnums=(0,),
    )
    return jitted.lower(
        abstract, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
    )

  def compile(self, state, batch, *, lowered: jax.stages.Lowered | None = None):
    """The executable for `batch`'s signature (compiled on first use, from `lowered` when
    the caller has it) and its state's formats."""
    key = _signature(batch)
    if key not in self._compiled:
      executable = (lowered or self.lower(state, batch)).compile()
      formats = executable.input_formats[0][0]
      layouts_of = lambda tree: [f.layout for f in jax.tree.leaves(tree)]  # noqa: E731
      if layouts_of(formats) != layouts_of(executable.output_formats[0]):
        # XLA chose the returned state's layouts apart from the donated one's: each step
        # would have to move its state back. Compiled again with the input's for both.
        executable = self.lower(state, batch, formats=formats).compile()
      self._compiled[key] = executable, formats
    return self._compiled[key]

  def place(self, state, batch):
    """`state` in the layouts the step compiled for `batch` reads (itself when it is)."""
    _, formats = self.compile(state, batch)
    leaves, want = jax.tree.leaves(state), jax.tree.leaves(formats)
    moved = sum(x.format.layout != f.layout for x, f in zip(leaves, want))
    if not moved:
      return state
    logging.info("moving %d of the %d state arrays into the step's layouts", moved, len(leaves))
    # A jitted identity rather than device_put: it relayouts global arrays of any number
    # of processes, and donating frees the old copies as it goes.
    return jax.jit(
        lambda s: s, in_shardings=(self._state_shardings,), out_shardings=formats, donate_argnums=0
    )(state)

  def __call__(self, state, batch):
    executable, _ = self.compile(state, batch)
    return executable(state, batch)
