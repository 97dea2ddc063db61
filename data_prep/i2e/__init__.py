"""I2E construction on Apache Beam: web image/alt-text pairs -> entity-labelled corpus.

One module per stage, each a `PTransform` testable alone (see types.py for the
elements that flow between them and pipeline.py for how they compose).
"""
