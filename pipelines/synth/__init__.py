"""Seeded demo-data generators: Rossmann-schema store sales and MovieLens-format ratings.

Every generator draws from one ``numpy.random.Generator`` built from ``seed``, so the same
arguments give byte-identical files. The data carry learnable structure (documented per
generator) so the demo models have something real to find.
"""

from pipelines.synth.ratings import GENRES, synth_ratings, write_ratings
from pipelines.synth.rossmann import synth_rossmann, write_rossmann

__all__ = ["GENRES", "synth_ratings", "synth_rossmann", "write_ratings", "write_rossmann"]
