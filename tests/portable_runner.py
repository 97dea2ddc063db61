"""Beam's portable runner on this machine: the Python local job service and an external SDK
worker pool, started as separate processes (the Fn API path of Flink, Spark and Dataflow
runner v2: the pipeline is serialised, staged, and run by other processes).

  with portable_services(tmp_path) as flags:
    subprocess.run([sys.executable, '-m', 'data_prep.build_kb', ..., *flags])
"""
import contextlib
import os
import socket
import subprocess
import sys
import time

from data_prep.demo_world import i2e_build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _wait_for(port, proc, log, timeout=120):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      raise RuntimeError(f'a portable-runner service exited early; see {log}')
    with socket.socket() as s:
      if s.connect_ex(('127.0.0.1', port)) == 0:
        return
    time.sleep(0.5)
  raise TimeoutError(f'nothing listens on port {port} after {timeout}s; see {log}')


@contextlib.contextmanager
def portable_services(folder, parallelism=2):
  """Starts the job service and the worker pool; yields the Beam flags that use them."""
  job_port, pool_port = free_port(), free_port()
  # A worker has one CPU device, as on a cluster; and the pool starts each SDK worker as
  # `python -c ...`, so this interpreter must come first on PATH, as the SDK container's
  # Python does on a cluster.
  env = dict(i2e_build.cpu_env(),
             PATH=os.pathsep.join((os.path.dirname(sys.executable), os.environ.get('PATH', ''))))
  procs = []
  try:
    for name, argv, port in (
        ('worker_pool', ['apache_beam.runners.worker.worker_pool_main',
                         f'--service_port={pool_port}'], pool_port),
        ('job_service', ['apache_beam.runners.portability.local_job_service_main',
                         f'--port={job_port}',
                         f'--staging_dir={os.path.join(folder, "staging")}'], job_port)):
      log = os.path.join(folder, f'{name}.log')
      with open(log, 'w') as f:
        procs.append(subprocess.Popen([sys.executable, '-m', *argv], cwd=ROOT, env=env,
                                      stdout=f, stderr=subprocess.STDOUT))
      _wait_for(port, procs[-1], log)
    yield ['--runner=PortableRunner', f'--job_endpoint=localhost:{job_port}',
           '--environment_type=EXTERNAL', f'--environment_config=localhost:{pool_port}',
           f'--sdk_worker_parallelism={parallelism}']
  finally:
    for proc in procs:
      proc.terminate()
    for proc in procs:
      try:
        proc.wait(timeout=20)
      except subprocess.TimeoutExpired:
        proc.kill()
