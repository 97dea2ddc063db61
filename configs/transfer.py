r"""Fine-tunes a trained model on a labelled image set with a fresh head (big_vision's
transfer configs): the image tower from a training workdir, a new linear head over the
set's classes, every weight trained.

  python -m mofi_jax.train --config configs/transfer.py:SOURCE_WORKDIR --workdir W \
      --config.input.dataset=imagefolder --config.input.data_dir=/data/pets

SOURCE_WORKDIR's config.json gives the image tower and the input size. `input.dataset` is
'imagefolder' (class_name/*.jpg, train/ and test/ or val/ folders, or each class cut in
half), 'folder' (GPR1200 layout) or a TFDS name with `input.data_dir` its data_dir;
`input.split` is the split trained on. The evals score the same dataset's test split: the
head's accuracy (`classifier`) and, for reference, a linear probe on the frozen features
of the model at that step (at step 0, the source model's).
"""
import json
import os

import ml_collections as mlc

from configs import common

SOURCE_MODEL_KEYS = ('image', 'embed_dim', 'dtype', 'scan', 'remat', 'attention')


def _source_config(source):
  """SOURCE/config.json as train.py writes it, or a one-line ValueError naming the file."""
  path = os.path.join(source, 'config.json')
  try:
    with open(path, encoding='utf-8') as f:
      raw = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f'configs/transfer.py:{source}: cannot read {path} '
                     f'({type(e).__name__}); pass a training workdir.') from None
  model, inputs = raw.get('model') if isinstance(raw, dict) else None, (
      raw.get('input') if isinstance(raw, dict) else None)
  if not (isinstance(model, dict) and isinstance(model.get('image'), dict) and
          isinstance(inputs, dict) and isinstance(inputs.get('image_size'), int)):
    raise ValueError(f'configs/transfer.py:{source}: {path} is not a training config '
                     '(expected model.image and input.image_size; a Hugging Face folder '
                     'starts a run through config.init.hf_clip instead).')
  return raw


def get_config(source=''):
  c = common.base_config('supervised')
  c.total_steps = 1000
  c.log_every = 50
  c.input.update(dataset='imagefolder', data_dir='', split='train', batch_size=128,
                 shuffle_buffer=4096, rrc_scale=(0.5, 1.0), train_per_category=5)
  c.model.head.update(num_classes=-1, kind='linear', pad_multiple=64, bias_init=0.0)
  c.optim.update(lr=1e-4, warmup_steps=50, weight_decay=0.05, head_lr_mult=30.0)
  c.ckpt.update(every_steps=500, keep=2)
  c.init.update(workdir=source, load='image')
  if source:
    model = _source_config(source)
    c.model.update({k: model['model'][k] for k in SOURCE_MODEL_KEYS if k in model['model']})
    c.input.image_size = model['input']['image_size']
  heldout = dict(dataset=c.input.get_ref('dataset'), data_dir=c.input.get_ref('data_dir'),
                 train_per_category=c.input.get_ref('train_per_category'),
                 every_steps=500, batch_size=200)
  c.evals.classifier = mlc.ConfigDict(dict(type='classifier', **heldout))
  c.evals.linear_probe = mlc.ConfigDict(dict(type='linear_probe', max_iter=300, **heldout))
  return c
