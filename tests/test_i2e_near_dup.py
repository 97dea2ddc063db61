"""NearDuplicates (data_prep/i2e/near_dup.py): banded pHash dedup within the corpus, checked
against a brute-force all-pairs reference on hashes, and on real re-encoded copies of one
photo-like image (JPEG qualities, resizes)."""
import io

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image, ImageFilter

from data_prep.i2e import global_passes, near_dup


def brute_force_dropped(records, max_distance):
  """All pairs, plain Python: a record leaves iff a better-ranked one is within reach."""
  dropped = set()
  for r in records:
    for s in records:
      if s.rank < r.rank and bin(r.phash ^ s.phash).count('1') <= max_distance:
        dropped.add(r.key)
        break
  return dropped


def clustered_hashes(rng, n, centres=12, flips=5):
  """Hashes around a few random centres, each 0..flips random bits away (plus repeats)."""
  base = [int(rng.integers(0, 2**63)) * 2 + int(rng.integers(2)) for _ in range(centres)]
  out = []
  for _ in range(n):
    h = base[int(rng.integers(centres))]
    for bit in rng.choice(64, size=int(rng.integers(flips + 1)), replace=False):
      h ^= 1 << int(bit)
    out.append(h)
  return out


def records_of(hashes, rng):
  return [near_dup.NearRecord((-int(rng.integers(4)), f'k{i:04d}'), f'f{i % 3}', i, h)
          for i, h in enumerate(hashes)]


@pytest.mark.parametrize('max_distance', [0, 3, 4])
def test_pipeline_equals_brute_force_all_pairs(max_distance):
  rng = np.random.default_rng(max_distance)
  records = records_of(clustered_hashes(rng, 300), rng)
  dropped = brute_force_dropped(records, max_distance)
  assert 20 < len(dropped) < len(records) - 12   # the case is neither trivial nor total
  with test_pipeline.TestPipeline() as p:
    out = p | beam.Create(records) | near_dup.NearDuplicates(max_distance)
    assert_that(out['main'] | 'Kept' >> beam.Map(lambda r: r.key),
                equal_to(sorted({r.key for r in records} - dropped)), label='kept')
    assert_that(out['filtered'] | 'Dropped' >> beam.Map(lambda f: (f.reason, f.key, f.count)),
                equal_to([('near_duplicate', k, 1) for k in dropped]), label='filtered')


def test_bucket_decision_in_small_blocks_equals_brute_force(monkeypatch):
  rng = np.random.default_rng(7)
  records = records_of(clustered_hashes(rng, 200, centres=3), rng)
  monkeypatch.setattr(near_dup, 'BLOCK_ROWS', 7)   # blocks that do not divide the hashes
  got = {r.key for r, d in zip(records, near_dup.dropped_in_bucket(records, 4)) if d}
  assert got == brute_force_dropped(records, 4)


def test_bands_cover_64_bits_and_pigeonhole():
  assert near_dup.band_widths(3) == [16, 16, 16, 16]
  assert near_dup.band_widths(4) == [13, 13, 13, 13, 12]
  with pytest.raises(ValueError, match='max_distance'):
    near_dup.band_widths(64)
  rng = np.random.default_rng(1)
  for _ in range(200):   # any two hashes within d bits share a band value exactly
    d = int(rng.integers(0, 8))
    a = int(rng.integers(0, 2**63)) << 1
    b = a
    for bit in rng.choice(64, size=d, replace=False):
      b ^= 1 << int(bit)
    widths = near_dup.band_widths(d)
    assert set(near_dup.band_values(a, widths)) & set(near_dup.band_values(b, widths))
  widths = near_dup.band_widths(3)
  assert near_dup.band_values(0xFFFF_0000_1234_0001, widths) == [
      (0, 0xFFFF), (1, 0), (2, 0x1234), (3, 1)]


# ----------------------------------------------------------------------------- real images


def photo(seed, size=256):
  """A photo-like image: smooth random blobs, blurred, with some texture."""
  rng = np.random.default_rng(seed)
  coarse = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
  image = Image.fromarray(coarse).resize((size, size), Image.BICUBIC)
  noise = rng.integers(-20, 20, (size, size, 3))
  pixels = np.clip(np.asarray(image, np.int32) + noise, 0, 255).astype(np.uint8)
  return Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(1))


def jpeg(image, quality, size=None):
  if size:
    image = image.resize((size, size), Image.LANCZOS)
  out = io.BytesIO()
  image.save(out, 'JPEG', quality=quality)
  return out.getvalue()


def test_re_encoded_copies_of_one_photo_are_near_duplicates():
  """Five re-encodings of one photo: one survives (the longest caption); other photos stay."""
  original = photo(0)
  copies = [jpeg(original, 95), jpeg(original, 75), jpeg(original, 40),
            jpeg(original, 85, size=160), jpeg(original, 60, size=400)]
  others = [jpeg(photo(s), 90) for s in range(1, 6)]
  hashes = [global_passes.phash64(b) for b in copies + others]
  distances = [bin(hashes[0] ^ h).count('1') for h in hashes]
  assert max(distances[:5]) <= 3 < min(distances[5:]), distances
  captions = ['img', 'product photo', 'red kettle, front view', 'kettle', 'IMG_0001']
  records = [near_dup.NearRecord((-len(t), f'copy{i}'), 'f', i, h)
             for i, (t, h) in enumerate(zip(captions, hashes))]
  records += [near_dup.NearRecord((-5, f'other{i}'), 'f', 10 + i, h)
              for i, h in enumerate(hashes[5:])]
  with test_pipeline.TestPipeline() as p:
    out = p | beam.Create(records) | near_dup.NearDuplicates(3)
    assert_that(out['main'] | beam.Map(lambda r: r.key),
                equal_to(['copy2'] + [f'other{i}' for i in range(5)]))
