"""Labeling components that the label recipe (and score) compose; none of them generates an image.

``pairing`` (K scored candidates -> preference pairs, seeds, relabelling a pair), ``shards`` (resumable,
multi-process parquet output), ``records`` (the shard schemas, image encoding, run summaries), ``relabel``
(scoring the pairs of an existing source), ``scoring`` (the scorer section and loading its scorer).
"""
