r"""Fine-tuning against the linear probe on the demo's held-out categories.

  python benchmarks/transfer.py --out DIR [--source W] [--corpus C] [--steps 300]

Without --source, first trains the demo model (`python -m mofi_jax.train --config
configs/demo.py --workdir DIR/source`, on --corpus if given, else building it). Then
fine-tunes it with configs/transfer.py on the held-out folder (40 categories unseen in
training; images 0-4 of each train, 5-9 test) for --steps steps and prints, from the
transfer run's eval_results.jsonl: the linear probe at step 0 (the source model's frozen
features), the fine-tuned head's accuracy at the end, and the linear probe at the end.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd):
  start = time.time()
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2',
             PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  subprocess.run(cmd, cwd=ROOT, env=env, check=True)
  return time.time() - start


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--out', required=True)
  parser.add_argument('--source', help='a trained workdir (default: train the demo)')
  parser.add_argument('--corpus', help='an existing demo corpus for the source run')
  parser.add_argument('--steps', type=int, default=300)
  args = parser.parse_args()
  source = args.source or os.path.join(args.out, 'source')
  train = [sys.executable, '-m', 'mofi_jax.train']
  if not args.source:
    extra = [f'--config.input.data_dir={args.corpus}'] if args.corpus else []
    secs = run(train + ['--config=configs/demo.py', f'--workdir={source}'] + extra)
    print(f'source: demo trained in {secs:.0f} s')
  with open(os.path.join(source, 'config.json')) as f:
    heldout = os.path.join(json.load(f)['input']['data_dir'], 'retrieval')
  target = os.path.join(args.out, f'transfer_{args.steps}')
  every = args.steps
  secs = run(train + [f'--config=configs/transfer.py:{source}', f'--workdir={target}',
                      '--config.input.dataset=folder', f'--config.input.data_dir={heldout}',
                      f'--config.total_steps={args.steps}', f'--config.ckpt.every_steps={every}',
                      f'--config.evals.classifier.every_steps={every}',
                      f'--config.evals.linear_probe.every_steps={every}'])
  with open(os.path.join(target, 'eval_results.jsonl')) as f:
    lines = {(r['step'], r['eval']): r for r in map(json.loads, f)}
  probe0, tuned = lines[(0, 'linear_probe')], lines[(args.steps, 'classifier')]
  probe_end = lines[(args.steps, 'linear_probe')]
  print(f'transfer: {args.steps} steps in {secs:.0f} s (evals included)')
  print(f'linear probe of the source model (step 0): top1 {probe0["top1"]:.3f}')
  print(f'fine-tuned head (step {args.steps}):          top1 {tuned["acc1"]:.3f}, '
        f'top5 {tuned["acc5"]:.3f}, mean per-class recall {tuned["mean_per_class_recall"]:.3f}')
  print(f'linear probe of the fine-tuned model:       top1 {probe_end["top1"]:.3f}')


if __name__ == '__main__':
  main()
