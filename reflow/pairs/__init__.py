"""Pairs on disk: generate (sharded, resumable), read, verify."""

from reflow.pairs.generate import PairsReader, generate_pairs, verify_pairs

__all__ = ["PairsReader", "generate_pairs", "verify_pairs"]
