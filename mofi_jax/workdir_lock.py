"""One training run per workdir: a lock file that names its holder.

`<workdir>/train.lock` holds {host, pid, start, job_id, heartbeat}. Process 0 of a job
takes it before anything is written and releases it at exit; the other processes of the
same `jax.distributed` job share it (they learn process 0's answer, so every process
stops together). A second run that finds the lock stops with a message naming the holder,
unless the lock is its own job's (`--job_id`, else $MOFI_JAX_JOB_ID, $SLURM_JOB_ID or
$JOBSET_NAME: the same on every restart of a pod job, which may come back on other hosts
before the lock goes stale) or is stale:
- same host, boot and pid namespace, and the holder's pid is gone (or is another process
  than the one that took the lock: its start time differs);
- any host, and the holder's heartbeat, refreshed every HEARTBEAT_SECONDS, is older than
  STALE_SECONDS (a host that died cannot clean up after itself).
Locally the lock is created with O_CREAT | O_EXCL | O_NOFOLLOW, so two runs cannot both
take it and a planted link is never written through. On object stores there is no
atomic create: the lock is then a best-effort check, which is what it can be there.
"""
import json
import os
import socket
import threading
import time

from mofi_jax import safe_outputs

LOCK_FILE = 'train.lock'
# Read when --job_id is not given: a pod job restarted on new hosts keeps its name.
JOB_ID_ENV = ('MOFI_JAX_JOB_ID', 'SLURM_JOB_ID', 'JOBSET_NAME')
HEARTBEAT_SECONDS = 60.0
STALE_SECONDS = 600.0


class WorkdirLockedError(ValueError):
  """Another run holds the workdir."""


def _process_start(pid):
  """The process's start time in clock ticks since boot (Linux), or None."""
  try:
    with open(f'/proc/{pid}/stat', encoding='ascii') as f:
      return int(f.read().rsplit(')', 1)[1].split()[19])
  except (OSError, ValueError, IndexError):
    return None


def _machine():
  """What makes a pid comparable: the boot and the pid namespace (two containers on one
  host share a hostname but not their pids)."""
  try:
    with open('/proc/sys/kernel/random/boot_id', encoding='ascii') as f:
      boot = f.read().strip()
    return f'{boot}:{os.readlink("/proc/self/ns/pid")}'
  except OSError:
    return None


def default_job_id():
  """The job's name from its scheduler, the same on every restart of the job."""
  for name in JOB_ID_ENV:
    if os.environ.get(name):
      return f'{name}={os.environ[name]}'
  return ''


def describe(record):
  when = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(record.get('start', 0)))
  return (f'host {record.get("host")}, pid {record.get("pid")}, started {when}, '
          f'job {record.get("job_id")}')


def is_stale(record, now=None):
  """Whether the holder described by `record` is gone (module docstring). A record that
  is not what we write (a crash mid-write, or junk) is stale."""
  now = time.time() if now is None else now
  try:
    if now - float(record.get('heartbeat', record.get('start'))) > STALE_SECONDS:
      return True
    if (record.get('host') != socket.gethostname() or
        record.get('machine') != _machine() or _machine() is None):
      return False   # its pid means nothing here: only the heartbeat tells
    pid = record['pid']
    if not isinstance(pid, int) or isinstance(pid, bool) or not safe_outputs.process_alive(pid):
      return True
    started = record.get('proc_start')
    return started is not None and _process_start(pid) not in (None, started)
  except (AttributeError, KeyError, TypeError, ValueError, OverflowError):
    return True


class WorkdirLock:
  """The lock held by this process (process 0 of its job)."""

  def __init__(self, workdir, job_id):
    self.path = os.path.join(workdir, LOCK_FILE)
    self.record = dict(host=socket.gethostname(), pid=os.getpid(), start=time.time(),
                       job_id=job_id or default_job_id(), machine=_machine(),
                       proc_start=_process_start(os.getpid()))
    self._stop = threading.Event()
    self._thread = None

  # ------------------------------------------------------------------ file
  def _read(self):
    try:
      if safe_outputs.is_object_store(self.path):
        import tensorflow as tf  # pylint: disable=import-outside-toplevel
        with tf.io.gfile.GFile(self.path) as f:
          return json.loads(f.read())
      fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
      with os.fdopen(fd, encoding='utf-8') as f:
        return json.loads(f.read(65536))
    except (OSError, ValueError):
      return None

  def _text(self):
    return json.dumps(dict(self.record, heartbeat=time.time()), sort_keys=True)

  def _create(self):
    """Writes the lock if none exists; False if one does."""
    text = self._text()
    if safe_outputs.is_object_store(self.path):
      import tensorflow as tf  # pylint: disable=import-outside-toplevel
      if tf.io.gfile.exists(self.path):
        return False
      with tf.io.gfile.GFile(self.path, 'w') as f:
        f.write(text)
      return True
    try:
      fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, 'w', encoding='utf-8') as f:
      f.write(text)
    return True

  def _remove(self):
    if safe_outputs.is_object_store(self.path):
      import tensorflow as tf  # pylint: disable=import-outside-toplevel
      tf.io.gfile.remove(self.path)
    else:
      os.unlink(self.path)   # a link is removed as a link, never followed

  def _ours(self, record):
    return isinstance(record, dict) and all(
        record.get(k) == self.record[k] for k in ('host', 'pid', 'start'))

  # --------------------------------------------------------------- public
  def acquire(self):
    """Takes the lock (replacing a stale one once), or raises WorkdirLockedError."""
    for _ in range(2):
      if self._create():
        self._thread = threading.Thread(target=self._beat, daemon=True,
                                        name='workdir-lock-heartbeat')
        self._thread.start()
        return self
      held = self._read()
      restarted = self.record['job_id'] and isinstance(held, dict) and (
          held.get('job_id') == self.record['job_id'])
      if not (restarted or is_stale(held)):
        raise WorkdirLockedError(
            f'{os.path.dirname(self.path)}: this workdir is in use by another training run '
            f'({describe(held)}). Wait for it, use another --workdir, or, if that run is '
            f'gone, delete {self.path}.')
      try:
        self._remove()
      except (OSError, FileNotFoundError):
        pass
    raise WorkdirLockedError(f'{self.path}: could not take the workdir lock (another run '
                             'took it at the same moment).')

  def _beat(self):
    while not self._stop.wait(HEARTBEAT_SECONDS):
      if not self._ours(self._read()):
        return   # taken over (it was judged stale): never write over another run's lock
      try:
        self._refresh()
      except OSError:
        pass

  def _refresh(self):
    if safe_outputs.is_object_store(self.path):
      import tensorflow as tf  # pylint: disable=import-outside-toplevel
      with tf.io.gfile.GFile(self.path, 'w') as f:
        f.write(self._text())
      return
    tmp = f'{self.path}.{os.getpid()}.tmp'
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, 'w', encoding='utf-8') as f:
      f.write(self._text())
    os.replace(tmp, self.path)

  def release(self):
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    if self._ours(self._read()):
      try:
        self._remove()
      except OSError:
        pass
