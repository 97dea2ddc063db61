"""The language of an alt-text, its stop words, and which NER pipeline reads it.

Mention finding follows the text's language: stop words and the NER gate are per language.
The language comes from py3langid (a naive Bayes model over byte n-grams, shipped inside the
package as an LZMA'd NumPy archive: no download, no pickle), restricted to the configured
languages, since an alt-text of five words is easier to place among six candidates than
among ninety-seven. With one configured language nothing is detected.

Stop words are spaCy's (`spacy.lang.<code>.stop_words`, no model needed), folded as the KB's
forms are (surface.py). English ones always apply: web alt-texts in every language mix in
English words ('photo', 'the', 'it').
"""
import functools

from data_prep.i2e import surface


# Languages whose nouns are all written with a capital: there a capital is no sign of a name.
NOUNS_CAPITALISED = frozenset({'de', 'lb'})


@functools.lru_cache(maxsize=None)
def stop_words(lang):
  """Folded stop words of `lang` (empty for a language spaCy has none for)."""
  import spacy  # pylint: disable=import-outside-toplevel
  try:
    words = spacy.util.get_lang_class(lang).Defaults.stop_words
  except (ImportError, KeyError):
    return frozenset()
  return frozenset(surface.normalize(w) for w in words)


class Detector:
  """text -> one of `languages` (the first when there is only one, or when py3langid knows
  none of the others)."""

  def __init__(self, languages):
    if not languages:
      raise ValueError('mentions.languages is empty: name at least one language code.')
    self.languages = tuple(languages)
    self._identifier = None
    if len(self.languages) > 1:
      from py3langid import langid  # pylint: disable=import-outside-toplevel
      identifier = langid.LanguageIdentifier.from_model_file(langid.MODEL_FILE)
      known = [l for l in self.languages if l in identifier.labels]
      if len(known) > 1:
        identifier.set_languages(known)
        self._identifier = identifier

  def __call__(self, text):
    if self._identifier is None or not text.strip():
      return self.languages[0]
    return self._identifier.classify(text)[0]


def parse_ner_models(spec):
  """mentions.ner_model -> {lang or '': pipeline name or folder}.

  '' -> {}; 'en_core_web_sm' (one pipeline: its own language, read from its meta when it is
  loaded) -> {'': 'en_core_web_sm'}; 'en:en_core_web_sm,fr:fr_core_news_sm' or a mapping ->
  {'en': ..., 'fr': ...}.
  """
  if not spec:
    return {}
  if hasattr(spec, 'items'):
    pairs = [(str(k), str(v)) for k, v in spec.items()]
  elif ':' in spec and not any(c in spec for c in '/\\'):
    pairs = []
    for part in spec.split(','):
      lang, sep, name = part.partition(':')
      if not sep or not lang.strip() or not name.strip():
        raise ValueError(f'mentions.ner_model={spec!r}: expected one pipeline, or '
                         "'lang:pipeline,lang:pipeline' (e.g. 'en:en_core_web_sm,"
                         f"fr:fr_core_news_sm'); the part {part!r} is neither.")
      pairs.append((lang.strip(), name.strip()))
  else:
    return {'': spec}
  langs = [l for l, _ in pairs]
  if len(set(langs)) != len(langs):
    raise ValueError(f'mentions.ner_model={spec!r} names a language twice.')
  return dict(pairs)


def by_language(pipelines):
  """{'' or lang: loaded spaCy Language} -> {lang: Language}; a pipeline given without a
  language gates its own (`nlp.lang`, from its meta.json)."""
  out = {}
  for lang, nlp in pipelines.items():
    lang = lang or nlp.lang
    if lang in out:
      raise ValueError(f'two NER pipelines for language {lang!r}.')
    out[lang] = nlp
  return out
