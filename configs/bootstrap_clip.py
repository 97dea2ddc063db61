"""The bootstrap CLIP: a small contrastive model trained on raw image/alt-text pairs.

  python -m data_prep.build_i2e --pairs 'web/pairs/*.tar' --out /tmp/pairs --pairs_only
  python -m mofi_jax.train --config configs/bootstrap_clip.py --workdir /tmp/bootstrap \
      --config.input.data_dir=/tmp/pairs

This is the paper's bootstrap: a CLIP trained on image-text pairs scores each linked
entity's text ('{name}, {description}') against the image, and the I2E pipeline keeps
the entities it sees (data_prep/i2e/select.py, `build_i2e --clip /tmp/bootstrap`).
Its corpus is a 'pairs' corpus (alt-texts, no entities), so the mode is contrastive
and the text is the alt-text. Sized for the demo (data_prep/demo_world/i2e_build.py
builds the demo corpus with it): about a minute on 2 CPU cores.
"""
import ml_collections as mlc

from configs import demo


def get_config():
  c = demo.get_config('contrastive')
  del c.input['recipe'], c.input['recipe_args']  # Its corpus: build_i2e --pairs_only.
  c.total_steps = 200
  c.log_every = 50
  # Entity texts ('Lequyl, a cyan star on a diagonally striped background') are longer
  # than most alt-texts; the text length is also the one the scorer tokenises to.
  c.input.update(data_dir='{workdir}/pairs', text_source='alt_text', text_len=24,
                 max_entities=1)
  # Smaller than the demo's towers: as good a selector at this scale, in a third less time.
  c.model.embed_dim = 96
  c.model.image.update(width=96, depth=3, num_heads=3, mlp_dim=384)
  c.model.text.update(width=96, depth=2, num_heads=3, mlp_dim=384, context=24)
  c.optim.update(warmup_steps=30)
  c.ckpt.update(every_steps=c.total_steps, keep=1)
  c.evals = mlc.ConfigDict()  # A pairs corpus has no held-out retrieval folder.
  return c
