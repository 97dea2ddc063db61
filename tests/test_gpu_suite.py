"""benchmarks/gpu_suite.sh, shrunk to run on a CPU (GPU_SUITE_TINY=1): the
attention check passes against the XLA reference and fails when it should; each
train step's printed figures agree with one another (images/s = batch / step
time, MFU = FLOPs / step time / peak)."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd, **env):
  e = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL='2',
           XLA_FLAGS='', **env)
  return subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=600)


def figures(line):
  return {k: float(v) for k, v in re.findall(r'(\w+)=([-\d.e+]+)', line)}


def test_tiny_suite_runs_and_its_figures_agree():
  p = run(['bash', 'benchmarks/gpu_suite.sh'], GPU_SUITE_TINY='1')
  assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
  out = p.stdout
  assert 'attention_check: OK' in out
  steps = out.split('== train step: ')[1:]
  assert [s.split()[0] for s in steps] == ['configs/mofi_b16.py:multitask',
                                           'configs/mofi_l14.py:multitask']
  for section in steps:
    batch = int(re.search(r'batch=(\d+)', section).group(1))
    timing = figures(re.search(r'^compile_s=.*$', section, re.M).group(0))
    cost = figures(re.search(r'^model_flops_per_step=.*$', section, re.M).group(0))
    peak = figures(re.search(r'^flops_per_step=.*$', section, re.M).group(0))
    assert abs(timing['images_per_s'] - batch / timing['step_s']) < 0.1 + 0.01 * timing['images_per_s']
    want = cost['model_flops_per_step'] / timing['step_s'] / peak['matmul_peak_flops_per_s']
    assert abs(cost['model_mfu'] - want) < 2e-3 + 0.01 * want


def test_attention_check_fails_beyond_its_tolerance():
  p = run([sys.executable, 'benchmarks/attention_check.py', '--implementation=head_major',
           '--dtype=float32', '--batch=1', '--heads=2', '--head_dim=8', '--image_len=9',
           '--text_len=5', '--tol=1e-12'])
  assert p.returncode == 1, p.stderr[-3000:]
  assert 'attention_check: FAILED' in p.stdout
