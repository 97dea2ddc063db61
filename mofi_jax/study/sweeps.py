"""The two sweeps' designs, fixed before their first full run (issue 35).

entities   Worlds of growing label space at a fixed number of images per entity, each
           built by the real I2E pipeline with its own bootstrap CLIP (trained for
           bootstrap_epochs passes over the world's pairs, or min_bootstrap_steps where that
           is more: 7.1 passes at 150 entities, 2.7 at 400, 2 from 1,000 up), selecting
           at the demo world's threshold. Four recipes, two
           seeds, one compute budget (steps x batch) per run. The attribute grid is the
           same at every size (8 shapes x 16 colours x 8 backgrounds x 3 sizes = 3,072
           combinations, world.py), so a larger world samples it more densely: its entities
           are finer, because more of them differ from another entity in one attribute only
           (a neighbouring hue, a size). The 40 held-out categories are the same at every
           size (`heldout_first`) and never trained on.
selection  One world (the entity sweep's 1,000-entity one); its I2E corpus rebuilt at CLIP
           thresholds from "keep everything linked" to strict, and with the text-only top-1
           linker; a multi-task model trained on each corpus.

--quick shrinks each design so that a sweep runs in minutes (tested in CI); its figures
check the machinery, not the findings.
"""
import dataclasses
import math
from typing import Optional, Tuple

from configs import bootstrap_clip

ALL_LINKED = -1e9   # a threshold no CLIP score is below: every linked mention is kept

# The attribute grid and the held-out set every entity-sweep world shares.
GRID = dict(num_colors=16, num_sizes=3, heldout_first=True, retrieval_categories=40,
            builder='i2e', seed=0)


@dataclasses.dataclass(frozen=True)
class EntitySweep:
  sizes: Tuple[int, ...]
  images_per_entity: int
  min_images: int
  bootstrap_epochs: float     # each world's bootstrap CLIP sees its pairs this many times,
  min_bootstrap_steps: int    # so that selection is about as good at every size
  arms: Tuple[str, ...]
  seeds: Tuple[int, ...]
  total_steps: int

  def world(self, num_entities):
    pairs = num_entities * self.images_per_entity
    steps = math.ceil(self.bootstrap_epochs * pairs / bootstrap_clip.get_config().input.batch_size)
    return dict(GRID, num_entities=num_entities, images_per_entity=self.images_per_entity,
                min_images=self.min_images,
                bootstrap_steps=max(self.min_bootstrap_steps, steps))


@dataclasses.dataclass(frozen=True)
class Corpus:
  """One corpus of the selection sweep: a CLIP threshold, or the text-only top-1 linker."""
  name: str
  threshold: float
  link_top_k: Optional[int] = None   # None: the pipeline's default (CLIP chooses the sense)


@dataclasses.dataclass(frozen=True)
class SelectionSweep:
  world: dict
  corpora: Tuple[Corpus, ...]
  arm: str
  seeds: Tuple[int, ...]
  total_steps: int

  @property
  def arms(self):
    return (self.arm,)


RECIPES = ('i2t_clip', 'i2e_clip_name_desc', 'supervised', 'mofi')

# The demo world's bootstrap sees its 12,106 pairs about twice (200 steps x 128).
ENTITIES = EntitySweep(sizes=(150, 400, 1000, 3000), images_per_entity=12, min_images=4,
                       bootstrap_epochs=2.0, min_bootstrap_steps=100, arms=RECIPES,
                       seeds=(0, 1), total_steps=200)
# Three sizes, not four: a world costs about a minute of fixed start-up (four processes, two
# compiles) however small it is.
ENTITIES_QUICK = EntitySweep(sizes=(20, 60, 200), images_per_entity=8, min_images=3,
                             bootstrap_epochs=4.0, min_bootstrap_steps=60, arms=RECIPES,
                             seeds=(0,), total_steps=16)


def _selection(world, thresholds, seeds, total_steps):
  corpora = [Corpus('all_linked', ALL_LINKED)]
  corpora += [Corpus(f'clip_{t:g}', t) for t in thresholds]
  corpora.append(Corpus('text_top1', ALL_LINKED, link_top_k=1))
  return SelectionSweep(world=world, corpora=tuple(corpora), arm='mofi', seeds=seeds,
                        total_steps=total_steps)


# The thresholds span the bootstrap CLIP's scores (cosine minus the text's mean cosine):
# 0.23 is the demo world's calibrated default (its corpus is the world's own, not rebuilt),
# 0.4 keeps little.
SELECTION = _selection(ENTITIES.world(1000), (0.05, 0.15, 0.23, 0.3, 0.4), (0, 1), 200)
SELECTION_QUICK = _selection(ENTITIES_QUICK.world(60), (0.1, 0.23, 0.35), (0,), 16)


def entities(quick):
  return ENTITIES_QUICK if quick else ENTITIES


def selection(quick):
  return SELECTION_QUICK if quick else SELECTION
