"""mofi_jax/workdir_lock.py: one training run per workdir, a stale lock taken over, never
a link written through; train.train_and_evaluate refuses a workdir in use before any work."""
import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from mofi_jax import workdir_lock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def plant(workdir, **record):
  base = dict(host=socket.gethostname(), pid=os.getpid(), start=time.time(),
              heartbeat=time.time(), job_id='', machine=workdir_lock._machine())
  (workdir / workdir_lock.LOCK_FILE).write_text(json.dumps(dict(base, **record)))


def finished_pid():
  proc = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                        capture_output=True, text=True, check=True)
  return int(proc.stdout)


def test_a_second_run_is_refused_with_the_holder_named(tmp_path):
  first = workdir_lock.WorkdirLock(str(tmp_path), 'job-a').acquire()
  with pytest.raises(workdir_lock.WorkdirLockedError,
                     match=rf'in use by another training run \(host {socket.gethostname()}, '
                     rf'pid {os.getpid()}, started .*, job job-a\).*delete .*train.lock'):
    workdir_lock.WorkdirLock(str(tmp_path), 'job-b').acquire()
  first.release()
  assert not (tmp_path / workdir_lock.LOCK_FILE).exists()
  workdir_lock.WorkdirLock(str(tmp_path), 'job-b').acquire().release()


@pytest.mark.parametrize('case', ['dead_pid', 'old_heartbeat', 'garbage', 'same_job',
                                  'huge_pid', 'text_heartbeat', 'not_an_object'])
def test_stale_or_own_job_lock_is_taken_over(tmp_path, case):
  if case == 'dead_pid':
    plant(tmp_path, pid=finished_pid())
  elif case == 'huge_pid':        # os.kill raises OverflowError on it
    plant(tmp_path, pid=2 ** 70)
  elif case == 'text_heartbeat':
    plant(tmp_path, heartbeat='soon')
  elif case == 'not_an_object':
    (tmp_path / workdir_lock.LOCK_FILE).write_text('[1, 2]')
  elif case == 'old_heartbeat':   # a host that died: its pid means nothing here
    plant(tmp_path, host='tpu-vm-17', heartbeat=time.time() - 2 * workdir_lock.STALE_SECONDS)
  elif case == 'garbage':         # a crash while writing it
    (tmp_path / workdir_lock.LOCK_FILE).write_text('{"host": ')
  else:                           # the same pod job, restarted on other hosts
    plant(tmp_path, host='tpu-vm-17', job_id='pod-job-1')
  lock = workdir_lock.WorkdirLock(str(tmp_path), 'pod-job-1').acquire()
  held = json.loads((tmp_path / workdir_lock.LOCK_FILE).read_text())
  assert (held['pid'], held['job_id']) == (os.getpid(), 'pod-job-1')
  lock.release()


@pytest.mark.parametrize('case', ['live_pid', 'other_host_fresh', 'other_container'])
def test_a_live_holder_is_never_taken_over(tmp_path, case):
  sleeper = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
  try:
    if case == 'live_pid':
      plant(tmp_path, pid=sleeper.pid)
    elif case == 'other_host_fresh':
      plant(tmp_path, host='tpu-vm-17', pid=1)
    else:   # same hostname, another pid namespace: its pid is not ours to check
      plant(tmp_path, pid=finished_pid(), machine='another-boot:pid:[4026531836]')
    before = (tmp_path / workdir_lock.LOCK_FILE).read_text()
    with pytest.raises(workdir_lock.WorkdirLockedError, match='in use'):
      workdir_lock.WorkdirLock(str(tmp_path), 'other').acquire()
    assert (tmp_path / workdir_lock.LOCK_FILE).read_text() == before
  finally:
    sleeper.kill()
    sleeper.wait()


def test_a_planted_link_is_never_written_through(tmp_path):
  target = tmp_path / 'precious.txt'
  target.write_text('keep me')
  (tmp_path / 'run').mkdir()
  os.symlink(target, tmp_path / 'run' / workdir_lock.LOCK_FILE)
  lock = workdir_lock.WorkdirLock(str(tmp_path / 'run'), '').acquire()
  assert target.read_text() == 'keep me'
  assert not os.path.islink(tmp_path / 'run' / workdir_lock.LOCK_FILE)
  lock.release()
  assert target.read_text() == 'keep me'


def test_release_leaves_a_lock_that_is_no_longer_ours(tmp_path):
  lock = workdir_lock.WorkdirLock(str(tmp_path), '').acquire()
  plant(tmp_path, pid=12345, job_id='the-new-holder')   # judged stale and taken over
  lock.release()
  assert json.loads((tmp_path / workdir_lock.LOCK_FILE).read_text())['job_id'] == 'the-new-holder'


def test_training_refuses_a_workdir_in_use_before_any_work(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, '-c', textwrap.dedent(f'''
          import sys, time
          sys.path.insert(0, {ROOT!r})
          from mofi_jax import workdir_lock
          workdir_lock.WorkdirLock({str(tmp_path)!r}, 'first-run').acquire()
          print('locked', flush=True)
          time.sleep(120)''')], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'locked'
    proc = subprocess.run(
        [sys.executable, '-m', 'mofi_jax.train', '--config', 'configs/demo.py', '--workdir',
         str(tmp_path)], capture_output=True, text=True, cwd=ROOT, check=False, timeout=300,
        env=dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3'))
    assert proc.returncode != 0
    errors = [l for l in proc.stderr.splitlines() if l.startswith('mofi_jax.train: error')]
    assert len(errors) == 1 and 'in use by another training run' in errors[0], proc.stderr
    assert f'pid {holder.pid}' in errors[0] and 'job first-run' in errors[0]
    assert 'Traceback' not in proc.stderr
    assert os.listdir(tmp_path) == [workdir_lock.LOCK_FILE]   # nothing written
  finally:
    holder.kill()
    holder.wait()
  # The holder was killed (SIGKILL: no clean-up); its lock is stale, and is taken over.
  lock = workdir_lock.WorkdirLock(str(tmp_path), 'second-run').acquire()
  lock.release()


def test_the_job_id_defaults_to_the_schedulers_name(tmp_path, monkeypatch):
  for name in workdir_lock.JOB_ID_ENV:
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv('SLURM_JOB_ID', '4242')
  plant(tmp_path, host='node-7', job_id='SLURM_JOB_ID=4242')   # the same job, restarted
  lock = workdir_lock.WorkdirLock(str(tmp_path), '').acquire()
  assert json.loads((tmp_path / workdir_lock.LOCK_FILE).read_text())['job_id'] == (
      'SLURM_JOB_ID=4242')
  lock.release()
