"""The image and text encoders -> a TF SavedModel, through jax2tf.

  python -m mofi_jax.export --workdir W --format savedmodel --out OUT

  m = tf.saved_model.load(OUT)
  out = m.signatures['embed_images'](images=x)   # float32 [B, S, S, 3], CLIP-normalised
  out['embedding']                               # [B, D], L2-normalised
  out['features']                                # [B, D], before normalisation
  m.signatures['embed_tokens'](tokens=ids)       # int32 [B, L] (tokenizer.json beside)

`serving_default` is `embed_images`. The batch size is polymorphic. jax2tf
serialises StableHLO for each of `platforms`; the weights are tf.Variables,
shared by both signatures. export_info.json records the input contract.
"""
import json
import os
import shutil

import jax

from mofi_jax import losses
from mofi_jax.data import preprocess, schema
from mofi_jax.interop import outputs
from mofi_jax.interop.clip_config import InteropError
from mofi_jax.models import mofi

PLATFORMS = ('cpu', 'cuda', 'tpu')
INFO_FILE = outputs.INFO_FILE
TOWER_PARAMS = ('image_tower', 'text_tower', 'log_logit_scale')


def _embed_fn(model, method):
  def embed(params, x):
    features = model.apply({'params': params}, x, method=method)
    return features, losses.l2_normalize(features)
  return embed


def _signature(tf, jax_fn, params, spec, poly, platforms):
  """A tf.function over `spec` (batch polymorphic) calling the converted jax_fn."""
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  converted = jax2tf.convert(jax_fn, polymorphic_shapes=[None, poly],
                             native_serialization_platforms=platforms)

  @tf.function(input_signature=[spec], autograph=False)
  def serve(x):
    features, embedding = converted(params, x)
    return {'features': features, 'embedding': embedding}
  return serve


def export_savedmodel(encoder, out, overwrite=False, platforms=PLATFORMS, inputs=()):
  """Writes the encoders of `encoder` as a SavedModel folder at `out`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  config = encoder.config
  size, length = int(config.input.image_size), int(config.input.text_len)
  # The towers only: the entity head (up to 2M classes) is not served here.
  params = {k: v for k, v in jax.device_get(encoder.params).items() if k in TOWER_PARAMS}
  module = tf.Module()
  module.params = tf.nest.map_structure(tf.Variable, params)
  signatures = {}
  signatures['embed_images'] = _signature(
      tf, _embed_fn(encoder.model, mofi.Mofi.encode_image), module.params,
      tf.TensorSpec([None, size, size, 3], tf.float32, name='images'),
      f'(b, {size}, {size}, 3)', platforms)
  if encoder.has_text:
    signatures['embed_tokens'] = _signature(
        tf, _embed_fn(encoder.model, mofi.Mofi.encode_text), module.params,
        tf.TensorSpec([None, length], tf.int32, name='tokens'), f'(b, {length})', platforms)
  signatures['serving_default'] = signatures['embed_images']
  for name, fn in signatures.items():
    setattr(module, name, fn)
  with outputs.staged_folder(out, overwrite, inputs) as tmp:
    try:
      tf.saved_model.save(module, tmp, signatures=signatures)
    except Exception as e:  # pylint: disable=broad-except  (TF's many error types)
      raise InteropError(f'{out}: TF could not save the SavedModel '
                         f'({type(e).__name__}: {str(e)[:300]}).') from e
    tokenizer = os.path.join(config.input.data_dir, schema.TOKENIZER_FILE)
    if encoder.has_text and os.path.isfile(tokenizer):
      shutil.copyfile(tokenizer, os.path.join(tmp, schema.TOKENIZER_FILE))
    with open(os.path.join(tmp, INFO_FILE), 'w', encoding='utf-8') as f:
      json.dump(dict(source=encoder.source, step=int(encoder.step), format='savedmodel',
                     signatures=sorted(signatures), platforms=list(platforms),
                     image_size=size, text_len=length, image_mean=list(preprocess.CLIP_MEAN),
                     image_std=list(preprocess.CLIP_STD),
                     text_pool=dict(config.model.text).get('pool', 'last_nonpad')
                     if encoder.has_text else None), f, indent=2, sort_keys=True)
  return out
