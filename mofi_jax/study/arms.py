"""The five models of the study: one image tower, one budget, five kinds of supervision.

Each arm is the demo config (configs/demo.py) with a different training signal:

  i2t_clip            CLIP on the raw alt-text pairs (the paper's "I2T" baseline)
  i2e_clip_name       CLIP on I2E, the entity name as text
  i2e_clip_name_desc  CLIP on I2E, name + description as text
  supervised          entity classification on I2E
  mofi                multi-task: classification + CLIP(name + description)

Same image tower, batch size, steps, optimizer and evaluators for all, so that
differences come from the data and the objective only.
"""
import dataclasses

from configs import demo

ARMS = {
    'i2t_clip': dict(mode='contrastive', corpus='pairs', text_source='alt_text'),
    'i2e_clip_name': dict(mode='contrastive', corpus='i2e', text_source='entity',
                          template='{name}'),
    'i2e_clip_name_desc': dict(mode='contrastive', corpus='i2e', text_source='entity',
                               template='{name}, {description}'),
    'supervised': dict(mode='supervised', corpus='i2e'),
    'mofi': dict(mode='multitask', corpus='i2e', text_source='entity',
                 template='{name}, {description}'),
}
FULL = dict(total_steps=240, seeds=(0, 1))
# --quick is a smoke run of the whole chain (a few minutes): one seed, so no spread.
QUICK = dict(total_steps=30, seeds=(0,))


@dataclasses.dataclass(frozen=True)
class Run:
  arm: str
  seed: int
  config: object    # ml_collections.ConfigDict, ready for train.train_and_evaluate

  @property
  def name(self):
    return f'{self.arm}/seed{self.seed}'


def arm_config(arm, seed, *, corpora, total_steps, curve_points=4):
  """The demo config turned into `arm`, trained on `corpora[spec.corpus]`, evaluated on
  `corpora['heldout']`: retrieval at `curve_points` + 1 steps, the rest at start and end;
  curve_points=0: every evaluator at the end only."""
  spec = ARMS[arm]
  c = demo.get_config(spec['mode'])
  c.seed = seed
  c.input.seed = seed
  c.total_steps = total_steps
  c.log_every = max(1, total_steps // 10)
  c.input.data_dir = corpora[spec['corpus']]
  c.input.recipe = None             # the study builds its corpora itself
  c.input.text_source = spec.get('text_source', c.input.text_source)
  c.input.entity_template = spec.get('template', c.input.entity_template)
  c.optim.warmup_steps = min(c.optim.warmup_steps, max(1, total_steps // 7))
  c.ckpt.update(every_steps=total_steps, keep=1)
  c.eval_at_start = curve_points > 0
  c.log.peak_flops_per_chip = -1.0   # no MFU: a study compares quality, not speed
  for name in list(c.evals.keys()):
    ev = c.evals[name]
    ev.every_steps = (max(1, total_steps // curve_points)
                      if ev.type == 'gpr1200' and curve_points else total_steps)
    ev.data_dir = corpora['heldout']
    if ev.get('type') == 'zeroshot' and spec['mode'] == 'supervised':
      del c.evals[name]             # no text tower: nothing to score class names with
  return c


def plan(corpora, *, quick=False, seeds=None, total_steps=None):
  budget = QUICK if quick else FULL
  seeds = tuple(seeds) if seeds else budget['seeds']
  steps = total_steps or budget['total_steps']
  return [Run(arm, seed, arm_config(arm, seed, corpora=corpora, total_steps=steps))
          for seed in seeds for arm in ARMS]
