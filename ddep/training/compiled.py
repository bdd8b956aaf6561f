"""Compiled steps reused across the runs of one process.

A process that trains several runs (the demo's worker processes, a sweep, the test suite)
would otherwise trace, lower and fetch from the persistent compilation cache the same init,
train and eval steps for every run: for a 200-step demo fine-tune that is about 10 of its
24 seconds. Two runs share a step when everything the step is built from is equal: the
config less the fields that only pick values (seeds, the labelled subset, where weights
come from) or host-side behaviour (intervals), plus the model, step count and shardings,
which the caller puts in the key.
"""

import collections
import json
import threading
from typing import Any, Callable, Hashable

# Fields that never reach a traced function: they choose the values that flow into a
# step (the seed lives in the train state, pretrained weights are arguments) or when the
# host does something. Everything else in the config is part of the key.
VALUE_ONLY_FIELDS = (
    # A label: the recipes turn it into the fields that do matter (frozen, optim.lr, ...).
    'method',
    'seed',
    'init_from',
    'init_encoder_from',
    'reinit',
    'data.subset_seed',
    'data.label_fraction',
    'data.label_count',
    'data.skip_bad_examples',
    'log_every',
    'eval_every',
    'checkpoint_every',
    'keep_checkpoints',
    'checkpoint_async',
    'profile',
)
# Compiled steps hold memory (their executables, not the weights). Each kind of run keeps
# three (init, placement, train step); a process rarely alternates between ten kinds.
MAX_ENTRIES = 32

_entries: 'collections.OrderedDict[Hashable, Any]' = collections.OrderedDict()
_lock = threading.Lock()


def config_key(config) -> str:
  """The config as a canonical string, without VALUE_ONLY_FIELDS."""
  tree = config.to_dict()
  for dotted in VALUE_ONLY_FIELDS:
    *parents, leaf = dotted.split('.')
    node = tree
    for name in parents:
      node = node.get(name, {})
    node.pop(leaf, None)
  return json.dumps(tree, sort_keys=True, default=repr)


def cached(key: Hashable, build: Callable[[], Any]) -> Any:
  """`build()` the first time `key` is seen in this process (or after it was evicted),
  else what that call returned."""
  with _lock:
    if key in _entries:
      _entries.move_to_end(key)
      return _entries[key]
  value = build()
  with _lock:
    _entries[key] = value
    while len(_entries) > MAX_ENTRIES:
      _entries.popitem(last=False)
  return value


def clear() -> None:
  with _lock:
    _entries.clear()
