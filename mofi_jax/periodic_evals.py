"""Runs the config's evaluators (`config.evals.<name>`) during training and
writes their results through CLU and to `<workdir>/eval_results.jsonl`.

Evaluators see the model through `evals.embedding.Towers` built from the current
parameters: images through the image tower, texts (zero-shot class prompts)
tokenised with the corpus tokenizer and run through the text tower.
"""
import json
import os

import jax
import tensorflow as tf
from absl import logging

from mofi_jax import evals, run_setup
from mofi_jax.data import schema
from mofi_jax.data import tokenizer as tokenizer_lib
from mofi_jax.evals import embedding
from mofi_jax.models import mofi


def from_config(config, *, data_dir, workdir):
  """{name: (evaluator, every_steps)}; paths may use {data_dir} and {workdir}."""
  out = {}
  for name, cfg in config.evals.items():
    cfg = cfg.copy_and_resolve_references()
    with cfg.unlocked():
      if isinstance(cfg.get('data_dir'), str):
        cfg.data_dir = cfg.data_dir.format(data_dir=data_dir, workdir=workdir)
      if cfg.get('resize') is None:  # the model's own, e.g. from a HF CLIP folder
        cfg.resize = config.input.get('eval_resize')
      if cfg.get('preprocess') is None:
        cfg.preprocess = config.input.get('eval_preprocess')
    # Bad eval settings or data stop the run at start-up with one line naming the eval.
    try:
      evaluator_cls = evals.get_evaluator(cfg.type)
      if getattr(evaluator_cls, 'needs_text', False) and not mofi.uses_text(config.model.mode):
        raise ValueError(f'{cfg.type} needs a text tower, but model.mode='
                         f'{config.model.mode!r} has none; remove this eval')
      out[name] = (evaluator_cls(cfg, image_size=config.input.image_size),
                   int(cfg.every_steps))
    except ValueError as e:
      raise run_setup.ConfigError(f'config.evals.{name}: {e}') from e
  return out


def towers_factory(config, data_dir, embed_images, embed_tokens=None, text_batch_size=256,
                   classify_images=None):
  """params -> Towers, from jitted `embed_*(params, host_batch)` functions (and the head's
  `classify_images(params, host_batch)`, for models with one).

  Texts are tokenised with the corpus tokenizer at config.input.text_len.
  """
  tokenize = None
  if embed_tokens is not None:
    tok = tokenizer_lib.load_tokenizer(os.path.join(data_dir, schema.TOKENIZER_FILE))
    length = int(config.input.text_len)
    tokenize = lambda texts: tokenizer_lib.tokenize(tok, texts, length)

  def towers(params):
    def embed_texts(texts):
      tokens = tokenize(texts)
      return embedding.embed_in_batches(lambda t: embed_tokens(params, t), tokens,
                                        min(text_batch_size, len(tokens)), desc='texts')
    return embedding.Towers(
        embed_images=lambda x: embed_images(params, x),
        embed_texts=embed_texts if tokenize else None,
        classify_images=(lambda x: classify_images(params, x)) if classify_images else None)
  return towers


def due(evaluators, step, last=False):
  return [name for name, (_, every) in evaluators.items()
          if last or step == 0 or step % every == 0]


def run(evaluators, names, step, towers, writer, workdir):
  for name in names:
    results = evaluators[name][0].run(towers)
    scalars = {f'{name}/{k}': float(v) for k, v in results.items()}
    writer.write_scalars(step, scalars)
    logging.info('eval %s at step %d: %s', name, step, scalars)
    if jax.process_index() == 0:
      with tf.io.gfile.GFile(os.path.join(workdir, 'eval_results.jsonl'), 'a') as f:
        f.write(json.dumps({'step': step, 'eval': name, **results}) + '\n')
