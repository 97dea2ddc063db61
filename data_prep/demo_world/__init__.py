"""The demo world: a procedural world of entities, and the corpora built from it.

Everything the demo and the study know about their synthetic world lives here; the
training library (mofi_jax/) knows nothing of it. `configs/demo.py` names the recipe
`demo_world` and mofi_jax/train.py resolves it at the entry point.

  world.py      entities as attribute combinations (shape x colour x background), names,
                the words of alt-texts
  render.py     images of those entities (numpy masks -> JPEG), the held-out retrieval folder
  config.py     the world's config fields, their checks, the stamp a corpus carries
  corpus.py     `ensure_corpus`: a corpus generated once, atomically, into a folder
  direct.py     builder 'direct': the labelled corpus written directly (seconds; tests)
  web.py        raw img2dataset-style web pairs and their ground truth
  web_kb.py     the world's knowledge base, written as a Wikidata dump
  i2e_build.py  builder 'i2e': web pairs -> the project's I2E commands -> corpus (minutes)
  selection.py  that corpus's selection scored against the ground truth
"""
from data_prep.demo_world.config import RETRIEVAL_DIR, default_config, resolve_config
from data_prep.demo_world.corpus import ensure_corpus

__all__ = ['RETRIEVAL_DIR', 'default_config', 'ensure_corpus', 'resolve_config']
