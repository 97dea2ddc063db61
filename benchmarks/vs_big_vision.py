r"""Our supervised train step against big_vision's, side by side on this machine:
the peer timer (../shared/peers/bigvision_step.py, big_vision imported from an
exported snapshot under $PEERS_DIR) and benchmarks/train_step.py run one after
the other, alternating, `--rounds` times each, in separate processes. Prints
every run's mean seconds per step and, per setting, ours / big_vision's
(ratio of the means).

  PEERS_DIR=/tmp/peers python benchmarks/vs_big_vision.py --settings a,b

Settings follow the peer timer's: a = S/16 batch 32, b = B/16 batch 16, both
224 px, 1,000 classes, fp32, one CPU device. Ours runs the same model in
supervised mode with big_vision's tanh GELU and fp32 everywhere, plus `--ours`
flags. Ours keeps its CLS token (197 tokens against big_vision's 196 with GAP),
so it does slightly more work.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER = os.path.join(os.path.dirname(ROOT), 'shared', 'peers', 'bigvision_step.py')
SETTINGS = {'a': ('S/16', 32), 'b': ('B/16', 16)}
OURS = ('--config=configs/mofi_b16.py:supervised --config.model.dtype=float32 '
        '--config.model.remat=none --config.model.head.num_classes=1000 '
        '--config.model.head.pad_multiple=1024 --config.model.attention=head_major '
        '--config.model.image.act=gelu_pytorch_tanh --config.loss.head_dtype=float32 '
        '--matmul_size=0')


def run(cmd):
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
  p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
  if p.returncode:
    sys.exit(f'{cmd[1]} failed ({p.returncode}):\n{p.stderr[-3000:]}')
  return p.stdout


def peer_step_s(setting, steps):
  out = run([sys.executable, PEER, f'--settings={setting}', '--no-matmul',
             f'--steps={steps}'])
  return statistics.mean(json.loads(out.strip().splitlines()[-1])['results'][0]['step_s'])


def our_step_s(setting, steps, extra):
  variant, batch = SETTINGS[setting]
  cmd = [sys.executable, 'benchmarks/train_step.py', *OURS.split(), *extra.split(),
         f'--config.model.image.variant={variant}', f'--config.input.batch_size={batch}',
         f'--steps={steps}']
  return float(re.search(r'step_s=([\d.]+)', run(cmd)).group(1))


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--settings', default='a,b')
  p.add_argument('--rounds', type=int, default=2)
  p.add_argument('--steps', type=int, default=5)
  p.add_argument('--ours', default='--config.optim.microbatches=4',
                 help='extra flags for benchmarks/train_step.py')
  args = p.parse_args()
  for setting in args.settings.split(','):
    peer, ours = [], []
    for r in range(args.rounds):
      peer.append(peer_step_s(setting, args.steps))
      ours.append(our_step_s(setting, args.steps, args.ours))
      print(f'{SETTINGS[setting][0]} round {r}: big_vision {peer[-1]:.3f} s, '
            f'ours {ours[-1]:.3f} s', flush=True)
    ratio = statistics.mean(ours) / statistics.mean(peer)
    print(f'{SETTINGS[setting][0]} batch {SETTINGS[setting][1]}: big_vision mean '
          f'{statistics.mean(peer):.3f} s, ours {statistics.mean(ours):.3f} s, '
          f'ours/big_vision={ratio:.3f}', flush=True)


if __name__ == '__main__':
  main()
