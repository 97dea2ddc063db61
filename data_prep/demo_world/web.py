"""Raw web-style image/alt-text pairs and the mini Wikidata dump they refer to.

The I2E pipeline's input, drawn from the same procedural world as the demo corpus
(world.py, render.py: the same entities, names and rendering for a seed):

  python -m data_prep.demo_world.web --out DIR [--seed 0 --num_entities 300 ...]

  DIR/pairs/NNNNN.tar               WebDataset shards as img2dataset writes them: {key}.jpg,
                                    {key}.json (caption, url, size, sha256, status), {key}.txt
  DIR/wikidata/latest-all.json.gz   the KB as a Wikidata dump (official layout)
  DIR/ground_truth.jsonl            per key ('pairs/{key}', as the corpus prefixes it by its
                                    folder): what is drawn, what the alt-text mentions
  DIR/retrieval/                    held-out GPR1200-layout folder (unseen attribute combos)
  DIR/web.json                      config, counts, generator version

KB: the world's drawable entities (label = name, description such as 'a cyan star on a
diagonally striped background', some with a nickname alias) and KB-only entities that are
never drawn: places ('Tobrun Harbour': 'a harbour in Keshu') and photographers ('Kraxa
Zuli'). Sitelinks (the popularity prior) grow with an entity's image count. Ambiguous
aliases (web_kb.py): a drawable entity's nickname is also an alias of a KB-only entity; in
regime 'prior' the drawable one is 4x as popular, in regime 'coherence' the KB-only one is
slightly more popular and the nickname is only written next to another drawn entity
(whose description shares words with the drawable one's, never with the KB-only one's).
In regime 'senses' 2 or 3 drawable entities share a name, and 35% of their mentions
use it: only the image tells which sense is meant. The ground truth records, per mention,
the intended entity and its `senses` (every entity the name could mean).

Alt-text of an image (its drawn entities are the truth): with probability `noise_frac`
it names nothing; otherwise it names each drawn entity by label or nickname, sometimes
with its attributes ('Lequyl the cyan star'); with probability `label_noise` a drawn
entity's name is replaced by another drawable entity's; with probability
`distractor_frac` a distractor (a drawable entity not drawn, a place or a photographer)
is named too ('... at Tobrun Harbour', 'photo: Kraxa Zuli').
"""
import argparse
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile

import numpy as np

from data_prep.demo_world import config as config_lib
from data_prep.demo_world import render, web_kb
from data_prep.demo_world import world as world_lib

WEB_VERSION = 3
PAIRS_DIR, PAIRS_GLOB = 'pairs', 'pairs/*.tar'
DUMP_PATH = 'wikidata/latest-all.json.gz'
GROUND_TRUTH_FILE = 'ground_truth.jsonl'
META_FILE = 'web.json'
ALIAS_FRAC = 0.35     # mentions of such an entity that use the nickname
SENSE_ALIAS_FRAC = 0.35  # mentions of a sense group's member that use the shared name
DESCRIBE_FRAC = 0.4   # true mentions followed by the entity's attributes
_DRAWN_PHRASES = (', not {d}', ' next to a poster of {d}', ' (see also {d})', ' like {d}')
_PLACE_PHRASES = (' at {d}', ', {d}', ' near {d}')
_PERSON_PHRASES = (' by {d}', ', photo: {d}', ' \N{COPYRIGHT SIGN} {d}')

# ----------------------------------------------------------------------------------------
# Entry points.


def write_web_pairs(out_dir, cfg=None, *, overwrite=False):
  """Generates into a temporary sibling of `out_dir`, then renames it into place.

  A non-empty `out_dir` is replaced only with `overwrite`, and only if it holds an
  earlier output (web.json), once the new one is complete.
  """
  out_dir = os.path.abspath(os.fspath(out_dir))
  cfg = config_lib.resolve_config(cfg)
  replace = os.path.isdir(out_dir) and bool(os.listdir(out_dir))
  if replace and not overwrite:
    raise FileExistsError(f'{out_dir}: folder is not empty; choose another one or pass '
                          '--overwrite.')
  if replace and not os.path.exists(os.path.join(out_dir, META_FILE)):
    raise FileExistsError(f'{out_dir}: holds no {META_FILE}, so it is not an output of '
                          'demo_world.web; refusing to replace it.')
  os.makedirs(os.path.dirname(out_dir), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(out_dir)}.tmp-',
                         dir=os.path.dirname(out_dir))
  try:
    generate(tmp, cfg)
    os.chmod(tmp, 0o755)
    if os.path.isdir(out_dir):
      os.rename(out_dir, tmp + '.old')
    os.rename(tmp, out_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(tmp + '.old', ignore_errors=True)
  return out_dir


def generate(out_dir, cfg):
  """Writes everything of the module docstring into the (empty) folder `out_dir`."""
  rng = np.random.default_rng(cfg.seed)
  world = world_lib.make_world(rng, cfg)
  labels = world_lib.draw_labels(rng, cfg)
  kb, regimes = web_kb.make_kb(rng, world, labels)
  texts, truths = zip(*[alt_text(rng, lab, kb, regimes, cfg) for lab in labels])
  images = render.render_jpegs(rng, [world.combos[l] for l in labels], cfg.image_size)
  keys = _write_shards(os.path.join(out_dir, PAIRS_DIR), images, texts, cfg.num_shards,
                       cfg.image_size)
  web_kb.write_dump(rng, os.path.join(out_dir, DUMP_PATH), kb)
  with open(os.path.join(out_dir, GROUND_TRUTH_FILE), 'w') as f:
    for key, lab, truth in zip(keys, labels, truths):  # The key as the corpus holds it.
      f.write(json.dumps(dict(key=f'{PAIRS_DIR}/{key}', **_drawn(world, kb, lab), **truth))
              + '\n')
  render.write_retrieval(world_lib.heldout_rng(rng, cfg),
                         os.path.join(out_dir, config_lib.RETRIEVAL_DIR), world.heldout,
                         cfg.image_size)
  kinds = [e.kind for e in kb]
  meta = dict(web_version=WEB_VERSION, num_pairs=len(keys),
              synthetic_config=config_lib.meta_stamp(cfg)['synthetic_config'],
              num_shards=cfg.num_shards, num_kb_entities=len(kb),
              num_non_visual=len(web_kb.non_visual_items(kb)),
              **{f'num_{k}': kinds.count(k) for k in ('drawable', 'place', 'person')},
              ambiguous_aliases={kb[a].aliases[0]: r for a, r in regimes.items()},
              pairs=PAIRS_GLOB, wikidata=DUMP_PATH, ground_truth=GROUND_TRUTH_FILE,
              retrieval_dir=config_lib.RETRIEVAL_DIR, num_retrieval_categories=len(world.heldout))
  with open(os.path.join(out_dir, META_FILE), 'w') as f:
    json.dump(meta, f, indent=1, sort_keys=True)
  return meta


def _drawn(world, kb, lab):
  bg = world_lib.BACKGROUNDS[world.combos[lab[0]][2]]  # Rendering uses the first's background.
  return dict(objects=[dict(entity=kb[e].qid, shape=world_lib.SHAPES[world.combos[e][0]],
                            color=world_lib.color_name(world.combos[e][1])) for e in lab],
              background=bg, true=[kb[e].qid for e in lab])


# ----------------------------------------------------------------------------------------
# Alt-texts with their ground truth.


def alt_text(rng, lab, kb, regimes, cfg):
  """(text, truth) for an image drawing the drawable entities `lab` (1 or 2 indices)."""
  words = {k: v[rng.integers(len(v))] for k, v in world_lib.WORDS.items()}
  words['filler2'] = world_lib.WORDS['filler'][rng.integers(len(world_lib.WORDS['filler']))]
  if rng.random() < cfg.noise_frac:
    pool = world_lib.NAMELESS
    text = pool[rng.integers(len(pool))].format(num=rng.integers(10000), **words)
    return text, dict(kind='noise', mentions=[], mentioned_true=[], distractors=[])
  c = sum(e.kind == 'drawable' for e in kb)
  named, mentions = [], []
  for e in lab:
    if rng.random() < cfg.label_noise:
      wrong = _other_drawable(rng, c, set(lab) | {m[1] for m in mentions})
      named.append(kb[wrong].label)
      mentions.append((kb[wrong].label, wrong, 'distractor'))
      continue
    surface = _surface(rng, kb, e, regimes, co_mentioned=len(lab) == 2)
    mentions.append((surface, e, 'true'))
    named.append(surface + _describe(rng, kb[e].description))
  pool = world_lib.PAIR if len(lab) == 2 else world_lib.NAMED
  text = pool[rng.integers(len(pool))].format(name=named[0], name2=named[-1], **words)
  if rng.random() < cfg.distractor_frac:
    d, phrases = _distractor(rng, kb, c, {m[1] for m in mentions} | set(lab))
    text += phrases[rng.integers(len(phrases))].format(d=kb[d].label)
    mentions.append((kb[d].label, d, 'distractor'))
  return text, _truth(text, mentions, kb, regimes)


def _surface(rng, kb, e, regimes, co_mentioned):
  frac = SENSE_ALIAS_FRAC if regimes.get(e) == 'senses' else ALIAS_FRAC
  if not kb[e].aliases or rng.random() >= frac:
    return kb[e].label
  if regimes.get(e) == 'coherence' and not co_mentioned:
    return kb[e].label  # Nothing in the text could tell the two entities apart.
  return kb[e].aliases[0]


def _describe(rng, description):
  """'' or the entity's attributes: ' the cyan star' or ' (a cyan star on a ... background)'."""
  r = rng.random()
  if r < DESCRIBE_FRAC / 2:
    return ' the ' + ' '.join(description.split()[1:3])
  return f' ({description})' if r < DESCRIBE_FRAC else ''


def _other_drawable(rng, c, exclude):
  while True:
    e = int(rng.integers(c))
    if e not in exclude:
      return e


def _distractor(rng, kb, c, exclude):
  """(KB index, phrases) of an entity that is not drawn: drawable, place or person."""
  r = rng.random()
  if r < 0.4 and c > len(exclude):
    return _other_drawable(rng, c, exclude), _DRAWN_PHRASES
  kind = 'place' if r < 0.7 else 'person'
  pool = [i for i in range(c, len(kb)) if kb[i].kind == kind]
  return pool[rng.integers(len(pool))], _PLACE_PHRASES if kind == 'place' else _PERSON_PHRASES


def _truth(text, mentions, kb, regimes):
  out = []
  for surface, e, role in mentions:
    # Whole words only: a name may be the prefix of another ('Bata', 'Batashu').
    found = re.search(rf'(?<!\w){re.escape(surface)}(?!\w)', text)
    if not found:
      raise RuntimeError(f'demo_world.web: mention {surface!r} not in alt-text {text!r}.')
    ambiguous = surface != kb[e].label and e in regimes
    senses = ([x.qid for x in kb if surface in x.aliases or surface == x.label] if ambiguous
              else [kb[e].qid])
    out.append(dict(start=found.start(), end=found.end(), text=surface, entity=kb[e].qid,
                    role=role, alias=surface != kb[e].label, ambiguous=ambiguous,
                    senses=senses))
  return dict(kind='named', mentions=out,
              mentioned_true=[m['entity'] for m in out if m['role'] == 'true'],
              distractors=[m['entity'] for m in out if m['role'] == 'distractor'])


# ----------------------------------------------------------------------------------------
# Writers: WebDataset shards (img2dataset layout) and the Wikidata dump.


def _write_shards(folder, images, texts, num_shards, size):
  """Keys '{shard:05d}{index:04d}' as img2dataset names them; returns keys in image order."""
  os.makedirs(folder)
  keys = []
  chunks = np.array_split(np.arange(len(images)), num_shards)
  width = max(4, len(str(max(len(ch) for ch in chunks))))
  for shard, chunk in enumerate(chunks):
    with tarfile.open(os.path.join(folder, f'{shard:05d}.tar'), 'w',
                      format=tarfile.USTAR_FORMAT) as tar:
      for index, i in enumerate(chunk):
        key = f'{shard:05d}{index:0{width}d}'
        keys.append(key)
        side = dict(url=f'https://img.example.com/{key}.jpg', caption=texts[i], key=key,
                    status='success', error_message=None, width=size, height=size,
                    original_width=size, original_height=size, exif='{}',
                    sha256=hashlib.sha256(images[i]).hexdigest())
        for ext, data in (('jpg', images[i]), ('json', json.dumps(side).encode()),
                          ('txt', texts[i].encode('utf-8'))):
          _add(tar, f'{key}.{ext}', data)
  return keys


def _add(tar, name, data):
  info = tarfile.TarInfo(name)  # Fixed metadata: same bytes on every run.
  info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
  tar.addfile(info, io.BytesIO(data))


# ----------------------------------------------------------------------------------------
# Command line.


def add_config_flags(parser):
  """One flag per field of config_lib.default_config(); true/false ones read 'true'/'false'."""
  for key, value in config_lib.default_config().items():
    parser.add_argument(f'--{key}', type=_flag_bool if isinstance(value, bool) else type(value),
                        default=value)


def _flag_bool(text):
  value = {'true': True, '1': True, 'yes': True, 'false': False, '0': False, 'no': False}.get(
      text.strip().lower())
  if value is None:
    raise argparse.ArgumentTypeError(f'expected true or false, got {text!r}')
  return value


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--out', required=True, help='folder to create')
  parser.add_argument('--overwrite', action='store_true', help='replace a non-empty --out')
  add_config_flags(parser)
  args = parser.parse_args(argv)
  cfg = {k: getattr(args, k) for k in config_lib.default_config()}
  try:
    out = write_web_pairs(args.out, cfg, overwrite=args.overwrite)
  except (ValueError, OSError) as e:
    sys.exit(f'demo_world.web: error: {e}')
  with open(os.path.join(out, META_FILE)) as f:
    meta = json.load(f)
  print(f'{out}: {meta["num_pairs"]} pairs in {meta["num_shards"]} shards, '
        f'{meta["num_kb_entities"]} KB entities ({meta["num_drawable"]} drawable, '
        f'{meta["num_place"]} places, {meta["num_person"]} photographers), '
        f'{len(meta["ambiguous_aliases"])} ambiguous aliases')


if __name__ == '__main__':
  main()
