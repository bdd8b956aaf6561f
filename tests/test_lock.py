"""ddep.runs.lock: one run per workdir, a stale lock taken over, the holder named."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from ddep.runs import lock as lock_lib


def _write(workdir, **record):
  path = workdir / lock_lib.LOCK_FILE
  path.write_text(json.dumps(record))
  return path


def test_a_second_start_fails_naming_the_holder_and_changes_nothing(tmp_path):
  with lock_lib.WorkdirLock(tmp_path) as first:
    before = (tmp_path / 'LOCK').read_text()
    with pytest.raises(lock_lib.WorkdirLockedError) as e:
      lock_lib.WorkdirLock(tmp_path).acquire()
    message = str(e.value)
    assert f'host {socket.gethostname()}, pid {os.getpid()}, started' in message, message
    assert first.record['started'] in message
    assert (tmp_path / 'LOCK').read_text() == before
  assert not (tmp_path / 'LOCK').exists()  # Released.


def test_the_lock_of_a_dead_process_on_this_host_is_taken_over_and_said_so(tmp_path):
  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()
  record = lock_lib.WorkdirLock(tmp_path).record
  _write(tmp_path, **{**record, 'pid': dead.pid, 'process_start': None, 'token': 'old'})
  lock = lock_lib.WorkdirLock(tmp_path).acquire()
  assert lock.took_over and f'pid {dead.pid}' in lock.took_over
  assert f'its process {dead.pid} is gone' in lock.took_over
  assert json.loads((tmp_path / 'LOCK').read_text())['token'] == lock.record['token']
  lock.release()


def test_a_reused_pid_is_stale_and_a_live_one_is_not(tmp_path):
  record = lock_lib.WorkdirLock(tmp_path).record  # This process: alive.
  now = time.time()
  assert lock_lib.stale_reason(record, now=now, stale_after=300) is None
  reused = {**record, 'process_start': 'another start time'}
  assert 'now belongs to another process' in lock_lib.stale_reason(reused, now=now, stale_after=300)


def test_another_hosts_lock_is_stale_only_without_a_recent_heartbeat(tmp_path):
  other = {'host': 'elsewhere', 'pid': 1, 'started': 'then', 'boot_id': 'x', 'token': 't'}
  now = time.time()
  assert lock_lib.stale_reason({**other, 'heartbeat': now - 10}, now=now, stale_after=300) is None
  reason = lock_lib.stale_reason({**other, 'heartbeat': now - 400}, now=now, stale_after=300)
  assert reason.startswith('no heartbeat for 400s')
  _write(tmp_path, **other, heartbeat=now - 10)
  with pytest.raises(lock_lib.WorkdirLockedError, match='host elsewhere, pid 1, started then'):
    lock_lib.WorkdirLock(tmp_path).acquire()


def test_the_heartbeat_keeps_a_long_run_fresh_and_release_leaves_a_newer_holder(tmp_path):
  lock = lock_lib.WorkdirLock(tmp_path, heartbeat=0.05).acquire()
  first = json.loads((tmp_path / 'LOCK').read_text())['heartbeat']
  time.sleep(0.3)
  assert json.loads((tmp_path / 'LOCK').read_text())['heartbeat'] > first
  lock.release()
  newer = _write(tmp_path, host='elsewhere', pid=1, started='now', token='new', heartbeat=1e12)
  lock.release()  # Not ours any more: kept.
  assert newer.exists()


def test_a_garbled_lock_file_is_stale_once_it_is_not_being_written(tmp_path):
  path = tmp_path / 'LOCK'
  path.write_text('{"host": ')  # A start killed mid-write.
  old = time.time() - 60
  os.utime(path, (old, old))
  lock = lock_lib.WorkdirLock(tmp_path).acquire()
  assert 'unreadable' in lock.took_over
  lock.release()


_RACER = """
import sys, time
from ddep.runs import lock as lock_lib
workdir, start = sys.argv[1], float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))
try:
  held = lock_lib.WorkdirLock(workdir).acquire()
except lock_lib.WorkdirLockedError as e:
  print('refused', e)
else:
  print('won', held.took_over or '')
  time.sleep(1.5)  # Held past every other start.
  held.release()
"""


@pytest.mark.parametrize('stale', [False, True], ids=['free', 'stale'])
def test_of_starts_racing_for_one_workdir_exactly_one_wins(tmp_path, stale):
  """Six processes start at the same instant, on a free workdir or one whose lock a
  killed run left (each would take it over): the kernel lets exactly one hold it."""
  if stale:
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    record = lock_lib.WorkdirLock(tmp_path).record
    _write(tmp_path, **{**record, 'pid': dead.pid, 'process_start': None, 'token': 'old'})
  start = time.time() + 2.0  # After every interpreter has started.
  env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  racers = [
      subprocess.Popen(
          [sys.executable, '-c', _RACER, str(tmp_path), str(start)],
          stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT,
          text=True,
          env=env,
      )
      for _ in range(6)
  ]
  outs = [p.communicate(timeout=60)[0] for p in racers]
  said = [o.splitlines()[-1] for o in outs]  # After absl's warning of a takeover, if any.
  won = [s for s in said if s.startswith('won')]
  assert len(won) == 1, outs
  assert all(s.startswith('refused') and 'one run per workdir' in s for s in said if s not in won)
  assert ('took over the stale lock' in won[0]) == stale, won
  assert not (tmp_path / 'LOCK').exists()  # Released by the winner.
