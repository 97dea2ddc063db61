"""The demo world: entities as combinations of visual attributes, their names and words.

An entity is a combination shape x foreground colour x background x size. All
combinations are shuffled with the seed; the first `num_entities` are the train entities
and the next `retrieval_categories` are held out for retrieval, so held-out categories are
new combinations of seen attributes: a model that learns attributes generalises to them, one
that memorises entities does not. Every builder draws the world first, so it is the same
for a seed.

The default world has 8 colours and one size (8 x 8 x 8 = 512 combinations). `num_colors`
up to 16 adds hues halfway between the first eight (closer colours) and `num_sizes` 3 adds
small and large objects: up to 3,072 combinations, for worlds of thousands of entities.
`heldout_first` takes the held-out categories from the front of the shuffle and renders
their images from a generator of their own (`heldout_rng`), so worlds of every
`num_entities` (same seed and grid) hold out the same categories in the same images.
"""
import dataclasses

import numpy as np

SHAPES = ('circle', 'square', 'triangle', 'diamond', 'cross', 'star', 'ring', 'hexagon')
COLORS = {
    'red': (220, 40, 40), 'orange': (245, 140, 20), 'yellow': (235, 220, 40),
    'green': (40, 180, 60), 'cyan': (40, 205, 215), 'blue': (40, 70, 225),
    'purple': (135, 50, 205), 'magenta': (225, 50, 170),
}
# Halfway between consecutive COLORS (red-orange, orange-yellow, ..., magenta-red); none can
# be a generated name (make_names: every syllable starts with a consonant).
EXTRA_COLORS = {
    'vermilion': (232, 90, 30), 'amber': (240, 180, 30), 'chartreuse': (140, 200, 50),
    'teal': (40, 192, 138), 'azure': (40, 138, 220), 'indigo': (88, 60, 215),
    'violet': (180, 50, 188), 'crimson': (222, 45, 105),
}
PALETTE = {**COLORS, **EXTRA_COLORS}
# Size 0 is the default world's (no word in the description); its radius factor is 1.
SIZES = ('', 'small', 'large')
SIZE_SCALE = (1.0, 0.65, 1.3)
BACKGROUNDS = ('dark', 'light', 'horizontally striped', 'vertically striped', 'checkered',
               'dotted', 'diagonally striped', 'gradient')


@dataclasses.dataclass
class World:
  """The procedural entities: attribute combos [C, 4] (shape, colour, background, size)."""
  combos: np.ndarray       # train entities
  heldout: np.ndarray      # retrieval categories: unseen combinations of seen attributes
  names: list
  qids: list
  descriptions: list


def make_world(rng, cfg):
  """The entity world of `cfg`; both builders draw it first, so it is the same for a seed."""
  grid = grid_shape(cfg)
  combos = np.stack(np.unravel_index(rng.permutation(int(np.prod(grid))), grid), 1)
  held = cfg.retrieval_categories
  if cfg.heldout_first:
    heldout, train_combos = combos[:held], combos[held:held + cfg.num_entities]
  else:
    train_combos, heldout = combos[:cfg.num_entities], combos[cfg.num_entities:][:held]
  names = make_names(rng, cfg.num_entities)
  qids = [f'Q{1000 + q}' for q in rng.choice(10_000_000, cfg.num_entities, replace=False)]
  return World(combos=train_combos, heldout=heldout, names=names, qids=qids,
               descriptions=[describe(c) for c in train_combos])


def heldout_rng(rng, cfg):
  """The generator the held-out images are drawn with: the world's own (the default world,
  whose images depend on everything drawn before them), or one of their own."""
  return np.random.default_rng([cfg.seed, 1]) if cfg.heldout_first else rng


def grid_shape(cfg):
  """(shapes, colours, backgrounds, sizes) of the world's attribute grid."""
  return (len(SHAPES), cfg.num_colors, len(BACKGROUNDS), cfg.num_sizes)


def color_name(index):
  return list(PALETTE)[index]


def describe(combo):
  size = SIZES[combo[3]] if len(combo) > 3 else ''
  shape, color, bg = SHAPES[combo[0]], color_name(combo[1]), BACKGROUNDS[combo[2]]
  adjectives = f'{size} {color}' if size else color
  article = 'an' if adjectives[0] in 'aeiou' else 'a'
  return f'{article} {adjectives} {shape} on a {bg} background'


def draw_labels(rng, cfg):
  """Per image: [entity] or [entity, other entity] (raw entity indices, shuffled order)."""
  per_entity = np.maximum(1, np.round(cfg.images_per_entity *
                                      rng.lognormal(0.0, 0.3, cfg.num_entities))).astype(int)
  primary = rng.permutation(np.repeat(np.arange(cfg.num_entities), per_entity))
  multi = rng.random(len(primary)) < cfg.multi_entity_frac
  # A uniform draw among the other entities: offset 1..C-1 modulo C.
  second = (primary + rng.integers(1, cfg.num_entities, len(primary))) % cfg.num_entities
  return [[int(p), int(s)] if m else [int(p)] for p, s, m in zip(primary, second, multi)]


# ----------------------------------------------------------------------------------------
# Names and noisy alt-texts.

_ONSETS = ('b', 'd', 'f', 'g', 'k', 'l', 'm', 'n', 'p', 'r', 's', 't', 'v', 'z', 'th', 'sh',
           'kr', 'br', 'dr', 'gl', 'tr', 'st', 'qu', 'x')
_VOWELS = ('a', 'e', 'i', 'o', 'u', 'ai', 'ou', 'ae', 'y')
_CODAS = ('', 'n', 'th', 'r', 'x', 's', 'l', 'k', 'm', 'sh', 'nd', 'rd')
WORDS = dict(
    place=('fair', 'beach', 'market', 'museum', 'park', 'harbour', 'festival', 'station', 'zoo'),
    adj=('lovely', 'old', 'new', 'tiny', 'famous', 'rare', 'shiny', 'strange', 'vintage'),
    filler=('photo', 'image', 'snapshot', 'wallpaper', 'hd', 'stock', 'free', 'download',
            'vacation', 'weekend', 'summer', 'art', 'closeup', '2019', 'best'))
NAMED = ('photo of {name} at the {place}', '{name} and friends', 'my {adj} {name}',
          '{name}, {filler} {filler2}', 'a picture of the {adj} {name}',
          '{filler} {name} {filler2}', 'look at this {name}!', '{name} spotted near the {place}',
          '{name}')
PAIR = ('{name} with {name2} at the {place}', '{name} and {name2}',
         '{filler}: {name2} next to {name}')
NAMELESS = ('{adj} day at the {place}', 'untitled {filler}', 'img_{num}',
             'my favourite {filler} {filler2}')


def make_names(rng, n):
  """`n` unique pronounceable made-up names, deterministic in `rng`."""
  names, seen = [], set()
  while len(names) < n:
    syllables = rng.integers(2, 4)
    parts = [_ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))]
             for _ in range(syllables)]
    name = (''.join(parts) + _CODAS[rng.integers(len(_CODAS))]).capitalize()
    if name not in seen:
      seen.add(name)
      names.append(name)
  return names
