"""One run per workdir: a lock file that names its holder and outlives a SIGKILL as stale.

Two starts of the same command on one workdir would interleave checkpoints, metrics rows
and event files (and orbax's start-up clean-up deletes the other run's temporaries). The
first start writes `<workdir>/LOCK` (JSON: host, pid, start time) and refreshes its
heartbeat while it runs; a second start fails at once, naming the holder, and changes
nothing. A lock left by a killed run is stale, and the next start takes it over and says so:
- on the holder's own host (same host name and boot), when its pid is gone or now belongs
  to a process started at another time (a reused pid);
- from any other host, when its heartbeat is older than `stale_after` seconds.

A local lock is also held with flock(2) for as long as the run's process lives, so the
kernel decides between starts that race, also for a stale lock that several take over at
once; the record names the holder and tells a killed run's lock (no flock) from a run on
another host of a shared filesystem (a fresh heartbeat). Object stores (gs://) have no
exclusive create through epath, so a start there writes its record, waits `settle`
seconds and reads it back: of two starts that both found no lock, only the later writer
reads back its own record, as long as each start writes within `settle` of its check.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from typing import Optional

from absl import logging

from ddep.runs import storage

LOCK_FILE = 'LOCK'
HEARTBEAT_SECONDS = 30.0
STALE_AFTER_SECONDS = 300.0
# A lock file younger than this that cannot be parsed is another start mid-write.
_WRITING_GRACE_SECONDS = 10.0
# A local record is rewritten in place (the flock belongs to the file), padded to one
# length so that a heartbeat never leaves it shorter or empty for a reader.
_LOCAL_RECORD_BYTES = 1024


class WorkdirLockedError(RuntimeError):
  """Another live run holds the workdir."""


def _boot_id() -> str:
  try:
    with open('/proc/sys/kernel/random/boot_id') as f:
      return f.read().strip()
  except OSError:
    return ''


def _process_start(pid: int) -> Optional[str]:
  """The kernel's start time of `pid` (clock ticks since boot), to tell a reused pid."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      # The command name (field 2) may hold spaces; the fields after ')' are fixed.
      return f.read().rsplit(')', 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # Someone else's process.
  return True


def describe(holder: dict) -> str:
  """'host H, pid P, started T' of a lock record."""
  return (
      f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
      f"started {holder.get('started', '?')}"
  )


def stale_reason(holder: dict, *, now: float, stale_after: float) -> Optional[str]:
  """Why the run that wrote `holder` cannot be alive, or None if it may be."""
  same_machine = holder.get('host') == socket.gethostname() and holder.get('boot_id') == _boot_id()
  if same_machine and isinstance(holder.get('pid'), int):
    pid = holder['pid']
    if not _pid_alive(pid):
      return f'its process {pid} is gone'
    start = holder.get('process_start')
    if start is not None and _process_start(pid) not in (None, start):
      return f'pid {pid} now belongs to another process'
    return None
  age = now - float(holder.get('heartbeat', 0.0))
  if age > stale_after:
    return f'no heartbeat for {age:.0f}s (more than {stale_after:.0f}s)'
  return None


class WorkdirLock:
  """The lock of one workdir, held from `acquire` to `release` (also a context manager)."""

  def __init__(
      self,
      workdir,
      *,
      heartbeat: float = HEARTBEAT_SECONDS,
      stale_after: float = STALE_AFTER_SECONDS,
      settle: float = 2.0,
  ):
    self.path = storage.path(workdir) / LOCK_FILE
    self._heartbeat = heartbeat
    self._stale_after = stale_after
    self._settle = settle
    pid = os.getpid()
    self.record = {
        'host': socket.gethostname(),
        'pid': pid,
        'started': datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
        'boot_id': _boot_id(),
        'process_start': _process_start(pid),
        'token': uuid.uuid4().hex,
        'heartbeat': time.time(),
    }
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None
    self._fd: Optional[int] = None  # The flocked local lock file, while held.
    self.took_over: Optional[str] = None  # What the stale lock said, if one was taken over.

  def _held_error(self, holder: dict) -> WorkdirLockedError:
    return WorkdirLockedError(
        f'{self.path} is held by another run ({describe(holder)}): one run per workdir. '
        'Wait for it to finish, stop it, or use another --workdir'
    )

  def _racing_error(self) -> WorkdirLockedError:
    return WorkdirLockedError(f'{self.path}: could not take the lock (other starts keep racing)')

  def _take_over(self, holder: dict, reason: str) -> None:
    self.took_over = f'took over the stale lock {self.path} ({describe(holder)}): {reason}'
    logging.warning('%s', self.took_over)

  def acquire(self) -> 'WorkdirLock':
    """Takes the lock, or raises WorkdirLockedError naming the live holder."""
    if not storage.is_url(self.path):
      return self._acquire_local()
    for _ in range(3):
      if self._try_create():
        self._start_heartbeat()
        return self
      holder = self._read()
      if holder is None:
        continue  # Released meanwhile, or another start mid-write: look again.
      reason = stale_reason(holder, now=time.time(), stale_after=self._stale_after)
      if reason is None:
        raise self._held_error(holder)
      self._take_over(holder, reason)
      self._remove_if(holder)
    raise self._racing_error()

  def _acquire_local(self) -> 'WorkdirLock':
    for _ in range(3):
      fd = os.open(os.fspath(self.path), os.O_CREAT | os.O_RDWR, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        os.close(fd)
        raise self._held_error(self._read_flocked_holder()) from None
      try:
        same_file = os.path.samestat(os.fstat(fd), os.stat(os.fspath(self.path)))
      except FileNotFoundError:
        same_file = False
      if not same_file:  # Released (unlinked) between our open and our flock: open anew.
        os.close(fd)
        continue
      # No live process of this kernel holds it: what is left is a killed run's record,
      # unless it is that of a run on another host of a shared filesystem.
      text = os.pread(fd, 1 << 16, 0).decode(errors='replace').strip()
      if text:
        holder = _parse(text) or _unreadable(text)
        reason = stale_reason(holder, now=time.time(), stale_after=self._stale_after)
        if reason is None:
          os.close(fd)
          raise self._held_error(holder)
        self._take_over(holder, reason)
      self._fd = fd
      self.record['heartbeat'] = time.time()
      self._write_local()
      self._start_heartbeat()
      return self
    raise self._racing_error()

  def _write_local(self) -> None:
    data = self._encoded().encode().ljust(_LOCAL_RECORD_BYTES)
    os.pwrite(self._fd, data, 0)
    os.ftruncate(self._fd, len(data))

  def _read_flocked_holder(self) -> dict:
    """The record of a live holder, which may be writing it in the first instants."""
    for _ in range(20):
      holder = _parse(self._read_text() or '')
      if holder is not None:
        return holder
      time.sleep(0.05)
    return _unreadable(self._read_text() or '')

  def _read_text(self) -> Optional[str]:
    try:
      return self.path.read_text()
    except FileNotFoundError:
      return None

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    if self._fd is not None:
      # Unlinked while still flocked: a start that opened it meanwhile sees that it was
      # released (another inode than the path's) and opens the path anew.
      try:
        if os.path.samestat(os.fstat(self._fd), os.stat(os.fspath(self.path))):
          os.unlink(os.fspath(self.path))
      except FileNotFoundError:
        pass
      os.close(self._fd)
      self._fd = None
      return
    holder = self._read()
    if holder is not None and holder.get('token') == self.record['token']:
      self.path.unlink(missing_ok=True)

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()

  def _encoded(self) -> str:
    return json.dumps(self.record, indent=1) + '\n'

  def _try_create(self) -> bool:
    self.record['heartbeat'] = time.time()
    if self.path.exists():
      return False
    self.path.write_text(self._encoded())
    time.sleep(self._settle)
    holder = self._read()
    return holder is not None and holder.get('token') == self.record['token']

  def _read(self) -> Optional[dict]:
    """The lock's record; None if there is none or it is another start's partial write.
    A garbled file older than the writing grace is a record with no heartbeat (stale)."""
    text = self._read_text()
    if text is None:
      return None
    holder = _parse(text)
    if holder is not None:
      return holder
    try:
      age = time.time() - self.path.stat().mtime
    except FileNotFoundError:
      return None
    if age < _WRITING_GRACE_SECONDS:
      time.sleep(_WRITING_GRACE_SECONDS - age)
      return None
    return _unreadable(text)

  def _remove_if(self, holder: dict) -> None:
    """Deletes the lock if it still holds `holder` (not a newer start's record)."""
    current = self._read()
    if current is None or current == holder:
      self.path.unlink(missing_ok=True)

  def _start_heartbeat(self) -> None:
    self._thread = threading.Thread(target=self._beat, name='ddep-workdir-lock', daemon=True)
    self._thread.start()

  def _beat(self) -> None:
    while not self._stop.wait(self._heartbeat):
      self.record['heartbeat'] = time.time()
      if self._fd is not None:  # Ours for as long as the flock is: rewritten in place.
        try:
          self._write_local()
        except OSError as e:
          logging.warning('%s: heartbeat failed: %s', self.path, e)
        continue
      try:
        holder = self._read()
        if holder is None or holder.get('token') != self.record['token']:
          logging.error('%s: this run no longer holds the lock (now: %s)', self.path, holder)
          return
        storage.write_text_atomic(self.path, self._encoded())
      except OSError as e:  # A storage hiccup: the next beat tries again.
        logging.warning('%s: heartbeat failed: %s', self.path, e)


def _parse(text: str) -> Optional[dict]:
  try:
    holder = json.loads(text)
  except ValueError:
    return None
  return holder if isinstance(holder, dict) else None


def _unreadable(text: str) -> dict:
  """A record that cannot be parsed: no heartbeat, so stale once no one holds it."""
  return {'host': '?', 'pid': '?', 'started': f'? (unreadable: {text.strip()[:80]!r})'}
