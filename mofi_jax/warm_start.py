"""Starting a run from one of our own checkpoints (config.init.workdir), before step 0.

  config.init.workdir = 'W'       a training workdir (config.json + checkpoints/)
  config.init.step = -1           its newest checkpoint, or that step
  config.init.load = 'towers'     what to take from it:
      'image'         the image tower
      'towers'        the image tower, and the text tower with the logit scale where both
                      runs have one
      'towers+head'   the towers and the entity head (the same number of classes)

Everything else keeps this run's fresh initialisation: a new head for a new label set, a
new text tower for a supervised source. Like config.init.hf_clip, it applies to a fresh
run only, never on resume. Each loaded leaf takes this run's sharding and dtype. The
towers must be the same architecture: a field that differs (width, depth, heads, patch,
activation, pooling, scan; unset fields read as the towers' defaults) is refused by name,
never loaded into a model that computes differently. A text tower loads only where both
runs read the same tokenizer (tokenizer.json of both corpora, byte for byte), and a head
only for the same number of classes and head kind.
"""
import dataclasses
import logging
import os

import jax
import tensorflow as tf
from flax import traverse_util

from mofi_jax import inference
from mofi_jax.data import schema
from mofi_jax.models import mofi
from mofi_jax.models.text import TextTower
from mofi_jax.models.vit import VisionTower

LOADS = {'image': ('image_tower',),
         'towers': ('image_tower', 'text_tower', 'log_logit_scale'),
         'towers+head': ('image_tower', 'text_tower', 'log_logit_scale', 'entity_head')}
TOWER_FIELDS = ('width', 'depth', 'num_heads', 'mlp_dim', 'act', 'patch', 'pool', 'ln_pre',
                'vocab_size', 'context', 'eot_id')


def _defaults(module):
  return {f.name: f.default for f in dataclasses.fields(module)
          if f.name in TOWER_FIELDS and f.default is not dataclasses.MISSING}


class WarmStartError(ValueError):
  """config.init.workdir cannot initialise this run; the message names the field."""


def check_init_config(config):
  init = config.init
  if init.get('workdir') and init.get('hf_clip'):
    raise WarmStartError('config.init.workdir and config.init.hf_clip are both set; '
                         'a run starts from one of them.')
  if init.get('workdir') and init.get('load', 'towers') not in LOADS:
    raise WarmStartError(f'config.init.load={init.load!r}; expected one of {sorted(LOADS)}')


def _towers(model_cfg):
  """{tower: its architecture fields}, unset ones at the module's defaults."""
  out = {'image_tower': {**_defaults(VisionTower), **mofi.image_kwargs(model_cfg.image)}}
  if mofi.uses_text(model_cfg.mode):
    out['text_tower'] = {**_defaults(TextTower), **dict(model_cfg.text)}
  return out


def _read_bytes(path):
  try:
    with tf.io.gfile.GFile(path, 'rb') as f:
      return f.read()
  except tf.errors.OpError:
    return None


def _check_same_tokenizer(source_cfg, data_dir, where):
  """A text tower's embedding rows mean tokens of its corpus's tokenizer: refuse another."""
  theirs = os.path.join(source_cfg.input.data_dir, schema.TOKENIZER_FILE)
  ours = os.path.join(data_dir, schema.TOKENIZER_FILE)
  a, b = _read_bytes(theirs), _read_bytes(ours)
  if a is None or a != b:
    why = f'{theirs} is unreadable' if a is None else f'{theirs} and {ours} differ'
    raise WarmStartError(f'{where}: its text tower reads another tokenizer ({why}); the '
                         'token embedding would mean other tokens. Use config.init.load=image, '
                         'or train on a corpus with the same tokenizer.json.')


def _check_same_head(source_cfg, config, where):
  for key in ('num_classes', 'kind'):
    theirs, ours = source_cfg.model.head.get(key), config.model.head.get(key)
    if theirs != ours:
      raise WarmStartError(f'{where}: config.model.head.{key}={theirs!r} there, {ours!r} here; '
                           'config.init.load=towers+head needs the same head.')


def _check_same_architecture(source_cfg, config, names, where):
  if bool(source_cfg.model.get('scan', False)) != bool(config.model.get('scan', False)):
    raise WarmStartError(f'{where}: config.model.scan={source_cfg.model.scan} there, '
                         f'{config.model.scan} here; the layer layouts differ.')
  theirs, ours = _towers(source_cfg.model), _towers(config.model)
  for tower in set(names) & set(ours):
    if tower not in theirs:
      continue   # e.g. a text tower for a supervised source: stays fresh
    for key in TOWER_FIELDS:
      if theirs[tower].get(key) != ours[tower].get(key):
        name = tower.split('_')[0]
        raise WarmStartError(f'{where}: config.model.{name}.{key}={theirs[tower].get(key)!r} '
                             f'there, {ours[tower].get(key)!r} here.')


def _selected(flat, names):
  return {path: leaf for path, leaf in flat.items() if path[0] in names}


def init_from_workdir(state_params, config, mesh, data_dir=None):
  """`state_params` (fresh, sharded) with the parts config.init.load names taken from
  config.init.workdir's checkpoint; data_dir: this run's corpus (default
  config.input.data_dir), whose tokenizer a loaded text tower must share."""
  check_init_config(config)
  source, load = config.init.workdir, config.init.get('load', 'towers')
  step = config.init.get('step', -1)
  source_cfg = inference.read_config(source)
  _check_same_architecture(source_cfg, config, LOADS[load], source)
  both = {p[0] for p in traverse_util.flatten_dict(state_params)} & set(LOADS[load])
  if 'text_tower' in both and mofi.uses_text(source_cfg.model.mode):
    _check_same_tokenizer(source_cfg, data_dir or config.input.data_dir, source)
  if 'entity_head' in both and mofi.uses_head(source_cfg.model.mode):
    _check_same_head(source_cfg, config, source)
  step, params = inference.restore_params(source, source_cfg, mesh,
                                          None if step is None or step < 0 else step)
  where = f'{source} (step {step})'
  theirs = traverse_util.flatten_dict(params)
  ours = traverse_util.flatten_dict(state_params)
  names = set(LOADS[load]) & {p[0] for p in ours}
  if load == 'towers+head' and 'entity_head' not in names:
    raise WarmStartError(f'config.init.load={load!r}, but this run '
                         f'(mode {config.model.mode!r}) has no entity head.')
  wanted = _selected(ours, names)
  present = {p[0] for p in theirs}
  for path, old in wanted.items():
    if path[0] not in present:
      if path[0] == 'entity_head':
        raise WarmStartError(f'{where} has no entity head (mode '
                             f'{source_cfg.model.mode!r}); use config.init.load=towers.')
      continue   # a tower the source lacks stays fresh
    new = theirs.get(path)
    if new is None or tuple(new.shape) != tuple(old.shape):
      got = 'missing' if new is None else tuple(new.shape)
      raise WarmStartError(f'{where}: parameter {"/".join(path)} is {got} there and '
                           f'{tuple(old.shape)} here.')
    ours[path] = jax.device_put(new.astype(old.dtype), old.sharding)   # on device, resharded
  loaded = sorted({p[0] for p in wanted if p[0] in present})
  logging.info('Initialised %s from %s.', ', '.join(loaded), where)
  return traverse_util.unflatten_dict(ours)
