"""The demo world's fields and defaults: the synthetic world and how its corpus is built.

  python -m data_prep.make_demo_corpus --out DIR [--num_entities 300 ...]   # one flag each
  python -m mofi_jax.train --config configs/demo.py --config.input.recipe_args.seed=1 ...

data_prep/demo_world/ builds the corpus (config.py checks these fields); configs/demo.py
trains on it, naming this as its corpus recipe's arguments.
"""
import ml_collections


def get_config():
  return ml_collections.ConfigDict(dict(
      seed=0,
      num_entities=300,
      images_per_entity=40,  # Mean; per-entity counts vary so that frequency order matters.
      num_shards=8,
      image_size=40,
      multi_entity_frac=0.15,
      label_noise=0.1,
      retrieval_categories=40,
      # The attribute grid (data_prep/demo_world/world.py): up to 16 colours and 3 sizes,
      # 3,072 combinations; heldout_first: the same held-out categories at every num_entities.
      num_colors=8,
      num_sizes=1,
      heldout_first=False,
      text_len=16,
      vocab_size=1000,
      noise_frac=0.1,        # alt-texts that name no entity at all
      builder='direct',      # 'direct' (the labelled corpus at once) | 'i2e' (the pipeline)
      # builder='i2e' only: web alt-texts that also name an entity that is not drawn;
      # bootstrap CLIP training steps; CLIP score threshold of the entity selection;
      # entities with fewer images are dropped.
      distractor_frac=0.3,
      bootstrap_steps=200,
      clip_threshold=0.23,
      min_images=10,
  ))
