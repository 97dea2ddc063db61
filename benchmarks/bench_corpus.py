"""The synthetic I2E corpus the input benchmarks read: JPEGs of `size` px in
the production format (web images are stored re-encoded, short side >= 224),
written once to /tmp/mofi_bench_corpus_<size>px."""
from data_prep import demo_world


def synthetic_corpus(size):
  path = f'/tmp/mofi_bench_corpus_{size}px'
  cfg = dict(num_entities=50, images_per_entity=20, num_shards=4, image_size=size,
             retrieval_categories=2, seed=0)
  return demo_world.ensure_corpus(path, cfg)
