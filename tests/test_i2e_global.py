"""GlobalPasses: entity counts, the min_images cut, class order, images left with no
entity, and near-duplicates of eval images (checked against imagehash directly)."""
import dataclasses
import io

import apache_beam as beam
import imagehash
import numpy as np
import pytest
from apache_beam.testing import test_pipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image, ImageDraw

from data_prep.i2e import global_passes, metadata, types
from test_i2e_read import image_bytes


def selected(key, ids, scores=None, image=None):
  scores = scores or [round(0.5 - 0.1 * i, 2) for i in range(len(ids))]
  return types.SelectedPair(types.Pair(key, image or image_bytes(sum(map(ord, key))), key, 's'),
                            tuple(ids), tuple(scores))


def test_class_order_most_frequent_first_then_q_number():
  counts = [('Q10', 3), ('Q9', 3), ('X1', 3), ('Q1', 1), ('Q200', 5), ('Q3', 2)]
  assert global_passes.class_order(counts, min_images=2) == (
      ('Q200', 5), ('Q9', 3), ('Q10', 3), ('X1', 3), ('Q3', 2))
  assert global_passes.class_order(counts, min_images=6) == ()


def test_drop_rare_keeps_order_and_scores():
  s = selected('k', ['Q1', 'Q2', 'Q3'], [0.9, 0.8, 0.7])
  kept = global_passes.drop_rare(s, frozenset({'Q1', 'Q3'}))
  assert (kept.entity_ids, kept.scores) == (('Q1', 'Q3'), (0.9, 0.7))
  assert global_passes.drop_rare(s, frozenset({'Q1', 'Q2', 'Q3'})) is s
  assert global_passes.drop_rare(s, frozenset({'Q4'})) == types.Filtered(
      'global', 'rare_entity_only', 'k')


def choice(mention, ids, chosen):
  n = len(ids)
  clip = tuple(0.3 - 0.1 * i for i in range(n))
  return types.MentionChoice(mention, tuple(ids), (0.9,) * n, clip, chosen, (0.05,) * n)


def test_drop_rare_keeps_choices_in_the_metadata_table(tmp_path):
  """A pair that loses a rare entity keeps its `mentions` column, as selection wrote it."""
  lost = [choice('Paris', ['Q90', 'Q167646'], 0), choice('Troy', ['Q9999'], 0)]
  pairs = [dataclasses.replace(selected('p1', ['Q90', 'Q9999']), choices=tuple(lost)),
           dataclasses.replace(selected('p2', ['Q90']), choices=(choice('Paris', ['Q90'], 0),))]
  rows = str(tmp_path / 'rows')
  with test_pipeline.TestPipeline() as p:
    out = p | beam.Create(pairs) | global_passes.GlobalPasses(min_images=2)
    _ = (out['main'] | beam.Map(metadata.row_json) | beam.combiners.ToList()
         | beam.Map(lambda r: open(rows, 'wb').write(b'\n'.join(sorted(r)))))
  with open(rows, 'rb') as f:
    metadata.write_shard(metadata.shard_path(str(tmp_path), 0, 1), f.read().split(b'\n'))
  table = {r['key']: r for r in metadata.read_table(str(tmp_path)).to_pylist()}
  assert table['p1']['entity_ids'] == ['Q90']                 # Q9999 is rare: cut
  expected = [dict(mention=c.mention, entity_ids=list(c.entity_ids), chosen=c.chosen)
              for c in lost]                                  # built from the input, not row_json
  assert [{k: m[k] for k in ('mention', 'entity_ids', 'chosen')}
          for m in table['p1']['mentions']] == expected
  assert np.allclose(table['p1']['mentions'][1]['clip_scores'], [0.3])
  assert [m['mention'] for m in table['p2']['mentions']] == ['Paris']


def view(x):
  if isinstance(x, types.SelectedPair):
    return x.pair.key, x.entity_ids, x.scores
  return x.reason, x.key


def test_global_passes_counts_cuts_and_indexes():
  pairs = [selected('p1', ['Q10', 'Q2']), selected('p2', ['Q2']), selected('p3', ['Q10']),
           selected('p4', ['Q7']), selected('p5', ['Q9', 'Q7'], [0.6, 0.3]),
           selected('p6', ['Q5']), selected('p7', ['Q7'])]
  with test_pipeline.TestPipeline() as p:
    out = p | beam.Create(pairs) | global_passes.GlobalPasses(min_images=2)
    assert_that(out['main'] | 'ViewMain' >> beam.Map(view), equal_to([
        ('p1', ('Q10', 'Q2'), (0.5, 0.4)), ('p2', ('Q2',), (0.5,)), ('p3', ('Q10',), (0.5,)),
        ('p4', ('Q7',), (0.5,)), ('p5', ('Q7',), (0.3,)), ('p7', ('Q7',), (0.5,))]),
                label='main')
    assert_that(out['filtered'] | 'ViewFiltered' >> beam.Map(view),
                equal_to([('rare_entity_only', 'p6')]), label='filtered')
    assert_that(out['dead_letter'], equal_to([]), label='dead')
    assert_that(out['classes'], equal_to([(('Q7', 3), ('Q2', 2), ('Q10', 2))]), label='classes')
    assert_that(out['entity_counts'], equal_to(
        [('Q10', 2), ('Q2', 2), ('Q7', 3), ('Q9', 1), ('Q5', 1)]), label='counts')


# ----------------------------------------------------------------------------- near duplicates


def drawing(shape, shift=0):
  image = Image.new('RGB', (96, 96), (30, 30, 30))
  draw = ImageDraw.Draw(image)
  box = (20 + shift, 20, 76 + shift, 76)
  (draw.ellipse if shape == 'circle' else draw.rectangle)(box, fill=(230, 200, 40))
  draw.line([0, 95, 95, 0], fill=(200, 40, 40), width=4)
  out = io.BytesIO()
  image.save(out, 'JPEG', quality=95)
  return out.getvalue()


def resized_copy(data, size, quality):
  out = io.BytesIO()
  Image.open(io.BytesIO(data)).resize((size, size), Image.BICUBIC).save(out, 'JPEG',
                                                                          quality=quality)
  return out.getvalue()


def ref_distance(a, b):
  """Independent reference: imagehash's own hash difference."""
  h = lambda x: imagehash.phash(Image.open(io.BytesIO(x)).convert('RGB'))
  return h(a) - h(b)


def test_phash64_and_min_hamming_agree_with_imagehash():
  a, b = drawing('circle'), drawing('square')
  assert global_passes.phash64(a) == int(str(imagehash.phash(
      Image.open(io.BytesIO(a)).convert('RGB'))), 16)
  hashes = np.array([global_passes.phash64(b), global_passes.phash64(a)], np.uint64)
  assert global_passes.min_hamming(global_passes.phash64(a), hashes) == 0
  assert global_passes.min_hamming(global_passes.phash64(a), hashes[:1]) == ref_distance(a, b)
  assert global_passes.min_hamming(1, np.zeros(0, np.uint64)) == float('inf')


def test_near_duplicates_of_eval_images_are_dropped_before_counting(tmp_path):
  eval_dir = tmp_path / 'gpr'
  eval_dir.mkdir()
  (eval_dir / '0_circle.jpg').write_bytes(drawing('circle'))
  (eval_dir / 'notes.txt').write_text('not an image')
  near = resized_copy(drawing('circle'), 128, quality=60)
  far = drawing('square', shift=8)
  far2 = drawing('square', shift=-8)
  eval_image = drawing('circle')
  assert ref_distance(near, eval_image) <= 4 < min(ref_distance(far, eval_image),
                                                   ref_distance(far2, eval_image))
  pairs = [selected('near', ['Q1'], image=near), selected('far', ['Q1'], image=far),
           selected('far2', ['Q1'], image=far2)]
  with test_pipeline.TestPipeline() as p:
    out = p | beam.Create(pairs) | global_passes.GlobalPasses(
        min_images=2, eval_dedup_dirs=[str(eval_dir)], phash_max_distance=4)
    assert_that(out['main'] | 'Keys' >> beam.Map(lambda s: s.pair.key),
                equal_to(['far', 'far2']), label='main')
    assert_that(out['filtered'] | 'ViewFiltered' >> beam.Map(view),
                equal_to([('near_duplicate_of_eval', 'near')]), label='filtered')
    assert_that(out['classes'], equal_to([(('Q1', 2),)]), label='classes')


def test_an_eval_folder_without_images_fails_at_construction(tmp_path):
  with pytest.raises(ValueError, match='holds no images'):
    global_passes.GlobalPasses(eval_dedup_dirs=[str(tmp_path)])
  with pytest.raises(ValueError, match='min_images'):
    global_passes.GlobalPasses(min_images=0)
