"""Every trained model on the held-out folder: embeddings for the t-SNE, and the
retrieval mAP per domain (the synthetic world's shapes play the part of GPR1200's
domains: landmarks, sketches, faces, ...)."""
import json
import os

import jax
import numpy as np

from mofi_jax import inference
from mofi_jax.data import pipeline
from mofi_jax.evals import gpr1200

DOMAIN_PREFIX = 'retrieval/map/'
DOMAIN_KEY = 'shape'   # the attribute of categories.json that names an image's domain


def embed_all(rows, folder):
  """({(arm, seed): [N, D]}, categories [N], domains [N]) from each run's final checkpoint."""
  embeddings, decoded = {}, {}   # the folder is decoded once per image size, not per run
  for r in rows:
    enc = inference.load(r['workdir'])
    if enc.image_size not in decoded:
      decoded[enc.image_size] = pipeline.make_eval_images(folder, enc.image_size)
    images, categories, _ = decoded[enc.image_size]
    embeddings[r['arm'], r['seed']] = enc.embed_images(images)
    jax.set_mesh(None)
  with open(os.path.join(folder, 'categories.json')) as f:
    domain_of = {c['category']: c[DOMAIN_KEY] for c in json.load(f)}
  return embeddings, categories, [domain_of[int(c)] for c in categories]


def domain_maps(features, categories, domains):
  """{'retrieval/map/<domain>': mAP over that domain's queries} (against the whole folder,
  as GPR1200 ranks each query against all 12,000 images)."""
  domains = np.asarray(domains)
  queries = {d: np.flatnonzero(domains == d) for d in sorted(set(domains.tolist()))}
  scores = gpr1200.mean_average_precision(features, categories, domains=queries)
  return {f'{DOMAIN_PREFIX}{d}': v for d, v in scores.items() if d != 'all'}
