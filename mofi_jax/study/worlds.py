"""The sweeps' data: demo worlds built once each, and one world's corpus rebuilt per threshold.

A world is `demo_world.ensure_corpus` under `{root}/worlds/{name}`: web pairs, KB, pairs
corpus, bootstrap CLIP and I2E corpus, all made by the project's own commands (see
data_prep/demo_world/i2e_build.py). It is built once; the two sweeps share a world when
their configs are equal, and a re-run finds it. A selection corpus is that world's step 5
(`python -m data_prep.build_i2e`) run again with another threshold or linker, written into
a temporary folder and renamed into place, so a killed build leaves nothing half-written.
"""
import hashlib
import json
import os
import shutil
import tempfile

from data_prep import demo_world
from data_prep.demo_world import i2e_build, selection, web
from mofi_jax.data import schema
from mofi_jax.study import data

WORLDS_DIR = 'worlds'
SELECTION_FILE = 'selection.json'


def world_name(world):
  return f'entities{world["num_entities"]}_ipe{world["images_per_entity"]}'


def build_world(root, world, log=print):
  """{'i2e', 'pairs', 'heldout', 'selection'} of the world `world` (a demo_world config
  dict), built under {root}/worlds/ unless already there; 'i2e' is the world's own corpus."""
  path = os.path.join(root, WORLDS_DIR, world_name(world))
  existed = os.path.exists(os.path.join(path, schema.META_FILE))
  corpus = demo_world.ensure_corpus(path, world)
  meta = schema.load_corpus_meta(corpus)
  log(f'world {world_name(world)}: {"found" if existed else "built"}: '
      f'{meta["num_train_examples"]} I2E images, {meta["num_entities"]} entities')
  return dict(i2e=corpus, pairs=os.path.join(corpus, i2e_build.BUILD_DIR, 'pairs'),
              heldout=os.path.join(corpus, demo_world.RETRIEVAL_DIR),
              selection=data.read_stats(corpus).get(i2e_build.SELECTION_KEY, {}))


def world_fingerprint(world_dir):
  """A digest of the world's entity table, tokenizer and shard sizes: a rebuilt world that
  differs (another bootstrap CLIP, another config) changes it."""
  digest = hashlib.sha256()
  for name in (schema.ENTITIES_FILE, schema.TOKENIZER_FILE):
    with open(os.path.join(world_dir, name), 'rb') as f:
      digest.update(f.read())
  for path in schema.list_shards(world_dir):
    digest.update(f'{os.path.basename(path)}:{os.path.getsize(path)}'.encode())
  return digest.hexdigest()[:16]


def build_selection_corpus(root, world_paths, world, corpus, log=print):
  """The world's I2E corpus rebuilt with `corpus`'s threshold and linker, under
  {root}/corpora/{world}/{name} (the world's own corpus at the world's threshold); returns
  (folder, selection metrics against the ground truth). A corpus built from another build
  of the world is refused."""
  cfg = demo_world.resolve_config(world)
  world_dir = world_paths['i2e']
  if corpus.threshold == cfg.clip_threshold and corpus.link_top_k is None:
    return world_dir, dict(world_paths['selection'], threshold=corpus.threshold)
  out = os.path.join(root, 'corpora', world_name(world), corpus.name)
  metrics_path = os.path.join(out, SELECTION_FILE)
  fingerprint = world_fingerprint(world_dir)
  if not os.path.exists(metrics_path):
    log(f'corpus {corpus.name}: building (threshold {corpus.threshold:g}, link top_k '
        f'{corpus.link_top_k or "default"})')
    _build_atomically(out, world_dir, cfg, corpus, fingerprint)
  with open(metrics_path) as f:
    metrics = json.load(f)
  if metrics.get('world_fingerprint') != fingerprint:
    raise schema.CorpusError(f'{out}: built from another build of the world {world_dir} '
                             f'(world fingerprint {metrics.get("world_fingerprint")}, now '
                             f'{fingerprint}); delete {out} to rebuild it.')
  return out, metrics


def _build_atomically(out, world_dir, cfg, corpus, fingerprint):
  build = os.path.join(world_dir, i2e_build.BUILD_DIR)
  paths = {k: os.path.join(build, k) for k in ('web', 'kb', 'bootstrap_clip')}
  os.makedirs(os.path.dirname(out), exist_ok=True)
  if os.path.exists(out):   # ours are renamed into place complete, with their metrics
    raise FileExistsError(f'{out}: exists without {SELECTION_FILE}, so it is not a corpus '
                          'this study built; move it away or choose another --workdir.')
  tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(out)}.tmp-', dir=os.path.dirname(out))
  try:
    logs = os.path.join(tmp, 'logs')
    os.makedirs(logs)
    argv = i2e_build.i2e_corpus_argv(paths, cfg, os.path.join(tmp, 'corpus'),
                                     threshold=corpus.threshold,
                                     link_top_k=corpus.link_top_k)
    seconds = i2e_build.run_step('i2e_corpus', argv, logs)
    metrics = selection.selection_metrics(
        os.path.join(tmp, 'corpus'), os.path.join(paths['web'], web.GROUND_TRUTH_FILE))
    metrics.update(seconds=round(seconds, 1), threshold=corpus.threshold,
                   link_top_k=corpus.link_top_k, world_fingerprint=fingerprint)
    for name in os.listdir(os.path.join(tmp, 'corpus')):
      os.rename(os.path.join(tmp, 'corpus', name), os.path.join(tmp, name))
    os.rmdir(os.path.join(tmp, 'corpus'))
    with open(os.path.join(tmp, SELECTION_FILE), 'w') as f:
      json.dump(metrics, f, indent=1, sort_keys=True)
    os.chmod(tmp, 0o755)
    os.rename(tmp, out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
