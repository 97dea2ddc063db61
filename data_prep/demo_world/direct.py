"""The fast builder (`builder='direct'`): the labelled corpus written directly.

Alt-texts are noisy (fillers, missing names, a wrong entity's name with probability
`label_noise`); the entity labels are always the entities actually drawn. Seconds, not
minutes: what the unit tests use.
"""
import hashlib
import os

import numpy as np
import tensorflow as tf

from data_prep.demo_world import render, world
from data_prep.demo_world.config import RETRIEVAL_DIR, meta_stamp
from mofi_jax.data import schema
from mofi_jax.data import tokenizer as tokenizer_lib


def generate(out_dir, cfg):
  """Writes the labelled corpus of the resolved config `cfg` into the empty `out_dir`."""
  rng = np.random.default_rng(cfg.seed)
  drawn = world.make_world(rng, cfg)
  train_combos, heldout_combos = drawn.combos, drawn.heldout
  names, qids, descriptions = drawn.names, drawn.qids, drawn.descriptions
  labels = world.draw_labels(rng, cfg)
  alt_texts = _alt_texts(rng, labels, names, cfg.label_noise, cfg.noise_frac)
  tok = tokenizer_lib.train_bpe(alt_texts + names + descriptions, cfg.vocab_size)
  tok.save(os.path.join(out_dir, schema.TOKENIZER_FILE))

  # Classes are indexed most-frequent-first, like the real pipeline.
  counts = np.bincount(np.concatenate(labels), minlength=cfg.num_entities)
  order = np.argsort(-counts, kind='stable')
  rank = np.empty_like(order)
  rank[order] = np.arange(len(order))
  table = schema.EntityTable(ids=[qids[i] for i in order], names=[names[i] for i in order],
                             descriptions=[descriptions[i] for i in order],
                             counts=counts[order].astype(np.int64))
  schema.write_entities(out_dir, table)

  images = render.render_jpegs(rng, [train_combos[l] for l in labels], cfg.image_size)
  eot = tokenizer_lib.eot_id(tok)
  tokens = [tokenizer_lib.fit_ids(e.ids, cfg.text_len, eot) for e in tok.encode_batch(alt_texts)]
  records = [_record(rng, img, [int(rank[e]) for e in lab], table, text, toks)
             for img, lab, text, toks in zip(images, labels, alt_texts, tokens)]
  if len({key for key, _ in records}) != len(records):
    raise RuntimeError('synthetic corpus: duplicate image keys (content hash collision).')
  _write_shards(out_dir, [r for _, r in records], cfg.num_shards)
  render.write_retrieval(world.heldout_rng(rng, cfg), os.path.join(out_dir, RETRIEVAL_DIR),
                         heldout_combos, cfg.image_size)
  meta = dict(schema_version=schema.SCHEMA_VERSION, num_entities=cfg.num_entities,
              num_train_examples=len(records), num_shards=cfg.num_shards,
              text_len=cfg.text_len, vocab_size=tok.get_vocab_size(),
              image_size=cfg.image_size, max_entities_per_example=2,
              retrieval_dir=RETRIEVAL_DIR, num_retrieval_categories=len(heldout_combos),
              **meta_stamp(cfg))
  schema.write_corpus_meta(out_dir, meta)


def _record(rng, jpeg, classes, table, alt_text, tokens):
  key = hashlib.sha1(jpeg).hexdigest()[:20]
  scores = np.round(rng.uniform(0.2, 0.4, len(classes)), 4).tolist()
  return key, schema.make_example(
      image=jpeg, key=key, classes=classes, entity_ids=[table.ids[c] for c in classes],
      scores=scores, alt_text=alt_text, alt_text_tokens=tokens)


def _write_shards(out_dir, records, num_shards):
  for i, chunk in enumerate(np.array_split(np.arange(len(records)), num_shards)):
    with tf.io.TFRecordWriter(os.path.join(out_dir, schema.shard_name(i, num_shards))) as w:
      for j in chunk:
        w.write(records[j])


def _alt_texts(rng, labels, names, label_noise, nameless_frac):
  """One noisy alt-text per image; with prob `label_noise` a wrong entity is named."""
  n, c = len(labels), len(names)
  kind = rng.random(n)
  noisy = rng.random((n, 2)) < label_noise
  wrong = rng.integers(0, c, (n, 2))
  picks = {k: rng.integers(0, len(v), (n, 2)) for k, v in world.WORDS.items()}
  template = rng.integers(0, 1 << 30, n)
  texts = []
  for i, lab in enumerate(labels):
    named = [names[wrong[i, j]] if noisy[i, j] and wrong[i, j] != e else names[e]
             for j, e in enumerate(lab)]
    if kind[i] < nameless_frac:
      pool = world.NAMELESS
    else:
      pool = world.PAIR if len(lab) == 2 and kind[i] < 0.7 else world.NAMED
    words = {k: world.WORDS[k][picks[k][i, 0]] for k in world.WORDS}
    texts.append(pool[template[i] % len(pool)].format(
        name=named[0], name2=named[-1], filler2=world.WORDS['filler'][picks['filler'][i, 1]],
        num=template[i] % 10000, **words))
  return texts
