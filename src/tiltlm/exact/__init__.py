"""Exact ground truth on enumerable spaces: every sequence, exact log Z, KLs, TV, entropies."""

from tiltlm.exact.enumerate import SequenceSpace, count_sequences, enumerate_space
from tiltlm.exact.quantities import entropy, exact_report, expectation, kl, normalise, tv

__all__ = ["SequenceSpace", "count_sequences", "entropy", "enumerate_space", "exact_report", "expectation", "kl", "normalise", "tv"]
