"""The knowledge-base build on Beam: a Wikidata dump -> a KB folder (python -m data_prep.build_kb).

  dump lines -> [SubclassClosure: P279 first pass] -> ParseWikidata -> WriteKnowledgeBase

Parsing one line is wikidata.py's; the P279 closure of the excluded types, wikidata_classes.py
(which reads wikidata.py's parsing helpers, so this stage list lives apart from both);
writing the folder, kb_write.py.
"""
import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from data_prep.i2e import kb as kb_lib
from data_prep.i2e import kb_index, kb_write, wikidata, wikidata_classes


def read_dump(p, patterns, name):
  """(source, line bytes) of every file that `patterns` match."""
  from apache_beam import coders  # pylint: disable=import-outside-toplevel
  reads = [p | f'{name}{i}' >> beam.io.ReadFromTextWithFilename(pattern, coder=coders.BytesCoder())
           for i, pattern in enumerate(patterns)]
  return reads | f'{name}Lines' >> beam.Flatten()


def build_pipeline(p, dump_patterns, out_dir, languages=('en',), num_shards=0,
                   fallback_languages=wikidata.FALLBACK_LANGUAGES, min_sitelinks=0,
                   excluded_types=None, index_shards=kb_index.DEFAULT_SHARDS,
                   subclass_closure=True,
                   max_candidates_per_alias=kb_index.DEFAULT_MAX_CANDIDATES):
  """Adds the KB build to pipeline `p`; returns the PCollection holding kb.json's contents.

  dump_patterns: a file pattern or a list of them (line-aligned chunks of a dump, as
  data_prep.split_dump writes them, are read in parallel, one file per worker). One
  compressed file cannot be split, so its lines are spread over workers before parsing.
  subclass_closure: a first pass closes the excluded types over P279 (wikidata_classes.py);
  chunks are read again for it, one file's spread lines are reused.
  max_candidates_per_alias: the alias index keeps each alias's best this many (0: all).
  """
  patterns = [dump_patterns] if isinstance(dump_patterns, str) else list(dump_patterns)
  files = [m.path for r in FileSystems.match(patterns) for m in r.metadata_list]
  if not files:
    raise kb_lib.KBError(f'--wikidata {patterns}: matches no file.')
  lines = read_dump(p, patterns, 'ReadDump')
  if len(files) == 1:
    lines = lines | 'Spread' >> beam.Reshuffle()
  excluded = wikidata.DEFAULT_EXCLUDED_TYPES if excluded_types is None else dict(excluded_types)
  classes = None
  if subclass_closure and excluded:
    first_pass = lines if len(files) == 1 else read_dump(p, patterns, 'ReadForSubclasses')
    classes = first_pass | 'SubclassClosure' >> wikidata_classes.SubclassClosure(excluded)
  languages = wikidata.language_order(languages, ())
  stages = lines | 'ParseWikidata' >> wikidata.ParseWikidata(
      languages, fallback_languages, min_sitelinks, excluded, classes)
  # 'language' (the first) stays for readers of KBs built before --languages.
  meta = dict(language=languages[0], languages=list(languages),
              fallback_languages=list(fallback_languages),
              min_sitelinks=min_sitelinks, source=patterns if len(patterns) > 1 else patterns[0],
              num_dump_files=len(files), excluded_types=excluded, subclass_closure=False)
  if classes is not None:
    stages = dict(stages, meta=classes | 'ClosureSummary' >> beam.Map(
        wikidata_classes.ClassKinds.summary))
  return stages | 'WriteKB' >> kb_write.WriteKnowledgeBase(out_dir, meta, num_shards,
                                                           index_shards, max_candidates_per_alias)
