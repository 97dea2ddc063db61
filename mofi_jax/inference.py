"""A trained model for inference: load a workdir's checkpoint, embed images and texts.

  enc = inference.load('/tmp/mofi_demo')            # newest checkpoint
  enc = inference.load('/tmp/mofi_demo', step=350)
  img = enc.embed_images(enc.preprocess(list_of_jpeg_bytes))   # [N, D], L2-normalised
  txt = enc.embed_texts(['Lequyl, a cyan star'])               # [N, D], L2-normalised

Every consumer of a trained model goes through `Encoder`: the evaluation suite,
the I2E pipeline's CLIP scorer and the exporters. Foreign weights (a Hugging Face
CLIP folder, see mofi_jax.interop) become an `Encoder` too, so all of them work
on either.

A training run writes `config.json` (the resolved config) beside its checkpoints;
`load` rebuilds the model from it and restores only what inference needs.
"""
import dataclasses
import functools
import json
import os
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tensorflow as tf

from mofi_jax import optim, sharding, trainer
from mofi_jax.data import eval_transform, schema
from mofi_jax.data import tokenizer as tokenizer_lib
from mofi_jax.models import mofi

CONFIG_FILE = 'config.json'


class LoadError(ValueError):
  """A workdir, checkpoint or weights folder cannot be loaded as asked."""


def write_config(workdir, config, data_dir):
  """Saves the resolved config, with the corpus path, beside the checkpoints."""
  if jax.process_index() != 0:
    return
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.input.data_dir = data_dir
  tf.io.gfile.makedirs(workdir)
  path = os.path.join(workdir, CONFIG_FILE)
  tmp = f'{path}.tmp-{os.getpid()}'
  with tf.io.gfile.GFile(tmp, 'w') as f:
    f.write(config.to_json(indent=2, sort_keys=True))
  tf.io.gfile.rename(tmp, path, overwrite=True)


def read_config(workdir):
  path = os.path.join(workdir, CONFIG_FILE)
  if not tf.io.gfile.exists(path):
    raise LoadError(f'{path} not found: {workdir} is not a mofi_jax training workdir '
                    '(train.py writes config.json when a run starts).')
  with tf.io.gfile.GFile(path) as f:
    try:
      raw = json.loads(f.read())
    except (ValueError, UnicodeDecodeError) as e:
      raise LoadError(f'{path}: not valid JSON ({e}).') from e
  _check_config_fields(raw, path)
  return ml_collections.ConfigDict(raw)


def _check_config_fields(raw, path):
  """The fields every reader of a workdir's config.json relies on, with their types."""
  if not isinstance(raw, dict):
    raise LoadError(f'{path}: expected a JSON object (a training config), got '
                    f'{type(raw).__name__}.')
  for section in ('model', 'input'):
    if not isinstance(raw.get(section), dict):
      raise LoadError(f'{path}: field {section!r} must be an object, got '
                      f'{type(raw.get(section)).__name__}.')
  size = raw['input'].get('image_size')
  if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
    raise LoadError(f'{path}: field input.image_size must be a positive integer, got '
                    f'{size!r}.')


@dataclasses.dataclass
class Encoder:
  """A model's image and text towers (and entity head, if any) ready to embed.

  config: the training config (`config.model`, `config.input.image_size`, ...).
  params: parameter pytree (host or sharded arrays).
  tokenize: texts -> int32 [N, text_len], or None for models without a text tower.
  entities: the corpus EntityTable, or None when the corpus is not at hand.
  step: the checkpoint step; source: where the weights came from.
  """
  config: Any
  params: Any
  tokenize: Optional[Callable] = None
  entities: Any = None
  step: int = 0
  source: str = ''
  mesh: Any = None

  def __post_init__(self):
    self.mesh = self.mesh or sharding.make_mesh(
        ml_collections.ConfigDict(dict(data=1, fsdp=-1, model=1)))
    self.model = mofi.build(self.config.model)
    specs = _param_shardings(self.model, self.config, self.mesh)
    self.params = jax.device_put(self.params, specs)
    # jax.jit compiles on first use, so the unused one costs nothing.
    self._embed_image, self._embed_image_raw = (
        trainer.make_embed_fn(self.model, mofi.Mofi.encode_image, self.mesh, specs,
                              normalize=normalize) for normalize in (True, False))
    if self.has_text:
      self._embed_text = trainer.make_embed_fn(
          self.model, mofi.Mofi.encode_text, self.mesh, specs)

  @property
  def image_size(self):
    return int(self.config.input.image_size)

  @property
  def text_len(self):
    return int(self.config.input.text_len)

  @property
  def has_text(self):
    return mofi.uses_text(self.config.model.mode)

  @property
  def has_head(self):
    return mofi.uses_head(self.config.model.mode)

  def preprocess(self, images_bytes, resize=None, method=None):
    """Encoded images -> float32 [N, S, S, 3]: resize, centre crop, CLIP mean/std, the
    `method` way (eval_transform.EVAL_PREPROCESSINGS; default: the model's own, else 'tf')."""
    resize = resize or self.config.input.get('eval_resize')   # set by HF imports
    method = method or self.config.input.get('eval_preprocess') or 'tf'
    fn = _eval_preprocess_fn(eval_transform.EvalTransform(self.image_size, resize, method))
    out = [fn(tf.constant(b)).numpy() for b in images_bytes]
    return np.stack(out) if out else np.zeros((0, self.image_size, self.image_size, 3),
                                              np.float32)

  def embed_images(self, images, batch_size=256, normalize=True):
    """float32 [N, S, S, 3] (preprocessed) -> float32 [N, D], L2-normalised.

    normalize=False: the image tower's raw output, what the linear entity head sees in
    training (`head_weights` scores it).
    """
    fn = self._embed_image if normalize else self._embed_image_raw
    return self._batched(fn, np.asarray(images, np.float32), batch_size)

  def embed_tokens(self, tokens, batch_size=1024):
    if not self.has_text:
      raise LoadError(f'{self.source}: a {self.config.model.mode!r} model has no text tower.')
    return self._batched(self._embed_text, np.asarray(tokens, np.int32), batch_size)

  def embed_texts(self, texts, batch_size=1024):
    """Strings -> float32 [N, D], L2-normalised."""
    if self.tokenize is None:
      raise LoadError(f'{self.source}: no tokenizer available for this model.')
    return self.embed_tokens(self.tokenize(list(texts)), batch_size)

  def head_weights(self):
    """(kernel [D, C], bias [C] or None, kind) of the entity head, padding removed; copied to
    the host once (a 2M-entity head is gigabytes, and a server asks on every request)."""
    if not self.has_head:
      raise LoadError(f'{self.source}: a {self.config.model.mode!r} model has no entity head.')
    if getattr(self, '_head_weights', None) is None:
      head = jax.device_get(self.params['entity_head'])
      c = int(self.config.model.head.num_classes)
      bias = head.get('bias')
      self._head_weights = (np.asarray(head['kernel'])[:, :c],
                            None if bias is None else np.asarray(bias)[:c],
                            self.config.model.head.kind)
    return self._head_weights

  def logit_scale(self):
    if not self.has_text:
      return None
    p = float(jax.device_get(self.params['log_logit_scale']))
    return float(np.exp(min(p, np.log(float(self.config.model.logit_scale_max)))))

  def _batched(self, fn, x, batch_size):
    out = [fn(self.params, x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, self.config.model.embed_dim), np.float32)


@functools.lru_cache(maxsize=8)
def _eval_preprocess_fn(transform):
  # Traced once per transform: eager TF per image is ~3x slower.
  return tf.function(transform,
                     input_signature=[tf.TensorSpec([], tf.string)])


def _param_shardings(model, config, mesh):
  batch = trainer.dummy_batch(config, batch_size=1)
  boxed = jax.eval_shape(model.init, jax.random.key(0), batch['image'], batch['text'])['params']
  return sharding.tree_shardings(mesh, nn.get_partition_spec(boxed))


def _abstract_state(config, mesh):
  """The TrainState's shapes with shardings, for an Orbax restore."""
  model = mofi.build(config.model)
  tx, _ = optim.make(config.optim, config.total_steps,
                     frozen=optim.frozen_modules(config.model))
  abstract, shardings = trainer.state_shardings(model, tx, mesh, trainer.dummy_batch(config, 1))
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def restore_params(workdir, config, mesh, step=None):
  """(step, params) from `workdir/checkpoints`: the newest step unless `step` is given."""
  ckpt_dir = os.path.join(os.path.abspath(workdir), 'checkpoints')
  if not tf.io.gfile.isdir(ckpt_dir):
    raise LoadError(f'{ckpt_dir}: no checkpoints folder in workdir {workdir}.')
  mngr = ocp.CheckpointManager(ckpt_dir, item_names=('state', 'meta'))
  steps = sorted(mngr.all_steps())
  if not steps:
    raise LoadError(f'{ckpt_dir}: no finished checkpoint (steps) found.')
  step = steps[-1] if step is None else int(step)
  if step not in steps:
    raise LoadError(f'{ckpt_dir}: no checkpoint for step {step}; available steps: {steps}.')
  with nn.logical_axis_rules(sharding.LOGICAL_RULES):
    abstract = _abstract_state(config, mesh)
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))
  except Exception as e:  # pylint: disable=broad-except
    raise LoadError(f'{ckpt_dir}/{step}: cannot restore ({type(e).__name__}: '
                    f'{str(e)[:300]}).') from e
  finally:
    mngr.close()
  return step, restored['state'].params


def corpus_tools(config):
  """(tokenize, entities) from the run's corpus folder, each None if absent."""
  data_dir = config.input.data_dir
  tokenize = entities = None
  tok_path = os.path.join(data_dir, schema.TOKENIZER_FILE)
  if mofi.uses_text(config.model.mode) and tf.io.gfile.exists(tok_path):
    tok = tokenizer_lib.load_tokenizer(tok_path)
    length = int(config.input.text_len)
    tokenize = lambda texts: tokenizer_lib.tokenize(tok, texts, length)
  if tf.io.gfile.exists(os.path.join(data_dir, schema.ENTITIES_FILE)):
    entities = schema.load_entities(data_dir)
  return tokenize, entities


def load(workdir, step=None, mesh=None):
  """The Encoder of a training workdir's checkpoint (newest unless `step`)."""
  config = read_config(workdir)
  mesh = mesh or sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=-1, model=1)))
  step, params = restore_params(workdir, config, mesh, step)
  tokenize, entities = corpus_tools(config)
  return Encoder(config=config, params=params, tokenize=tokenize, entities=entities,
                 step=step, source=f'{workdir} (step {step})', mesh=mesh)

