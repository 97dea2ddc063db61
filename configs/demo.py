"""The embedded default: a small multi-task MOFI on a synthetic I2E corpus.

  python -m mofi_jax.train --config configs/demo.py --workdir /tmp/mofi_demo

On first use the recipe `demo_world` builds the corpus the real way into
`{workdir}/corpus`: synthetic web image/alt-text pairs (a few hundred procedurally
drawn "entities", distractor mentions and noise) and a mini Wikidata dump go
through the Beam I2E pipeline, whose CLIP selection uses a small CLIP first
trained on the raw pairs (see data_prep/demo_world/; ~3-4 min). A held-out GPR1200-layout retrieval set of
unseen categories comes with it. Training then takes a few minutes on 2 CPU cores.
"""
import ml_collections as mlc

from configs import common, demo_world


def get_config(mode='multitask'):
  c = common.base_config(mode)
  c.total_steps = 700
  c.log_every = 100
  c.input.update(batch_size=128, image_size=32, text_len=16,
                 shuffle_buffer=2000, rrc_scale=(0.5, 1.0))
  c.input.recipe = 'demo_world'   # see mofi_jax/train.py's CORPUS_RECIPES
  c.input.recipe_args = demo_world.get_config()
  c.input.recipe_args.builder = 'i2e'   # 'direct' writes the corpus without the pipeline
  c.model.update(embed_dim=128, dtype='float32', scan=False)
  c.model.image = dict(variant=None, width=128, depth=4, num_heads=4,
                       mlp_dim=512, patch=8, pool='cls', act='gelu', ln_pre=True)
  c.model.text = dict(vocab_size=-1, context=16, width=128, depth=2,
                      num_heads=4, mlp_dim=512, act='gelu')
  c.model.head.update(pad_multiple=64)
  c.loss.tile_size = 128
  c.optim.update(lr=2e-3, warmup_steps=100, weight_decay=0.05)
  c.ckpt.update(every_steps=350, keep=2)
  # All on the held-out retrieval folder (categories unseen in training); kNN
  # and the linear probe train on images 0-4 of each category, test on 5-9.
  heldout = dict(data_dir='{data_dir}/retrieval', every_steps=350,
                 batch_size=200)
  c.evals.retrieval = mlc.ConfigDict(dict(type='gpr1200', **heldout))
  if mode != 'supervised':  # zero-shot needs the text tower
    c.evals.zeroshot = mlc.ConfigDict(dict(
        type='zeroshot', dataset='folder', split='all', templates='identity',
        **heldout))
  c.evals.knn = mlc.ConfigDict(dict(
      type='knn', dataset='folder', k=10, temperature=0.07, **heldout))
  c.evals.linear_probe = mlc.ConfigDict(dict(
      type='linear_probe', dataset='folder', max_iter=300, **heldout))
  return c
