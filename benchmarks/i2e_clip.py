r"""I2E stage e throughput: pairs/s per core for CLIP scoring (select.ClipModel, what each
RunInference batch runs), with random weights of a given size.

  python benchmarks/i2e_clip.py                      # the demo CLIP: ViT 128x4, patch 8, 32 px
  python benchmarks/i2e_clip.py --model s16_224      # ViT-S/16 at 224 px, 6-layer 384 text tower
  python benchmarks/i2e_clip.py --cores 2 --pairs 256

The process is pinned to --cores CPUs before JAX/TF start their thread pools; rates are pairs per
CPU-second of this process, so they are per core even on a busy machine. Each pair is a 320x256
JPEG with 3 candidate entity texts drawn from a pool of --entities texts. Reported:
  preprocess   decode + resize + centre crop (Encoder.preprocess), per image
  image        image tower, batches of --batch_size
  text         text tower on the distinct texts (cold cache)
  score cold   ClipModel.score, empty text-embedding cache (first batches of a worker)
  score warm   ClipModel.score, every entity text cached (steady state on a large corpus)
"""
import argparse
import io
import os
import sys
import time


def pin(cores):
  avail = sorted(os.sched_getaffinity(0))
  os.sched_setaffinity(0, avail[:cores])
  return len(avail[:cores])


def model_config(name, vocab_size):
  from configs import common, demo  # pylint: disable=import-outside-toplevel
  if name == 'demo':
    c = demo.get_config('contrastive')
  elif name == 's16_224':
    c = common.base_config('contrastive')
    c.input.update(image_size=224, text_len=77)
    c.model.update(embed_dim=384, dtype='float32', scan=False)
    c.model.image = dict(variant='S/16', pool='cls', act='gelu', ln_pre=True)
    c.model.text.update(width=384, depth=6, num_heads=6, mlp_dim=1536, context=77)
  else:
    raise ValueError(f'--model {name!r}: expected demo or s16_224')
  c.model.text.vocab_size = vocab_size
  return c


def random_encoder(config, tokenize, seed=0):
  """An inference.Encoder with N(0, 0.02) weights (no init compile: values into the shapes)."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from mofi_jax import inference, trainer  # pylint: disable=import-outside-toplevel
  from mofi_jax.models import mofi  # pylint: disable=import-outside-toplevel
  model = mofi.build(config.model)
  batch = trainer.dummy_batch(config, batch_size=1)
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), batch['image'],
                                   batch['text'])['params'])
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda a: (rng.normal(size=a.shape) * 0.02).astype(a.dtype), shapes)
  return inference.Encoder(config=config, params=params, tokenize=tokenize, source='random')


def make_pairs(rng, n, texts, k=3, size=(320, 256)):
  import numpy as np  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from data_prep.i2e import select, types  # pylint: disable=import-outside-toplevel
  out = []
  xx = np.mgrid[0:size[1], 0:size[0]][1]
  for i in range(n):
    base = (rng.random(3) * 255)[None, None] * (xx[..., None] / size[0])
    img = (base + rng.normal(0, 20, base.shape)).clip(0, 255).astype('uint8')
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format='JPEG', quality=90)
    chosen = tuple(texts[j] for j in rng.choice(len(texts), size=k, replace=False))
    lp = types.LinkedPair(types.Pair(f'k{i}', buf.getvalue(), 'alt', 'bench'), ())
    out.append(select.ClipExample(lp, chosen))
  return out


def timed(fn):
  start = time.process_time()
  out = fn()
  return out, time.process_time() - start


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='demo', choices=('demo', 's16_224'))
  parser.add_argument('--pairs', type=int, default=256)
  parser.add_argument('--entities', type=int, default=2000)
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--cores', type=int, default=1)
  args = parser.parse_args(argv)
  cores = pin(args.cores)
  import numpy as np  # pylint: disable=import-outside-toplevel
  from data_prep.i2e import select  # pylint: disable=import-outside-toplevel
  from mofi_jax.data import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(0)
  texts = [f'Entity {i} {rng.integers(1e6)}, a thing of kind {i % 37} from place {i % 101}'
           for i in range(args.entities)]
  tok = tokenizer_lib.train_bpe(texts, 1000)
  config = model_config(args.model, tok.get_vocab_size())
  length = int(config.input.text_len)
  enc = random_encoder(config, lambda t: tokenizer_lib.tokenize(tok, t, length))
  examples = make_pairs(rng, args.pairs, texts)
  bs = args.batch_size
  warm = select.ClipModel(enc)
  warm.score(examples[:bs])                                 # compile for the batch shapes
  enc.embed_texts(texts[:bs])

  images = [ex.linked.pair.image for ex in examples]
  x, t_pre = timed(lambda: np.concatenate([enc.preprocess(images[i:i + bs])
                                           for i in range(0, len(images), bs)]))
  _, t_img = timed(lambda: [enc.embed_images(x[i:i + bs]) for i in range(0, len(x), bs)])
  distinct = sorted({t for ex in examples for t in ex.texts})
  _, t_txt = timed(lambda: enc.embed_texts(distinct, batch_size=bs))
  cold = select.ClipModel(enc)
  _, t_cold = timed(lambda: [cold.score(examples[i:i + bs]) for i in range(0, len(examples), bs)])
  _, t_warm = timed(lambda: [cold.score(examples[i:i + bs]) for i in range(0, len(examples), bs)])

  n = len(examples)
  print(f'i2e_clip: model {args.model} ({config.input.image_size} px, embed '
        f'{config.model.embed_dim}), {n} pairs x 3 texts ({len(distinct)} distinct), '
        f'batch {bs}; {cores} core(s)')
  print(f'  preprocess  {n / t_pre:9.1f} images/s per core')
  print(f'  image       {n / t_img:9.1f} images/s per core')
  print(f'  text        {len(distinct) / t_txt:9.1f} texts/s per core')
  print(f'  score cold  {n / t_cold:9.1f} pairs/s per core')
  print(f'  score warm  {n / t_warm:9.1f} pairs/s per core')
  return 0


if __name__ == '__main__':
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  sys.exit(main())
