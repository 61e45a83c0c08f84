"""evomerge: evolutionary merge-optimization for LLMs."""

__version__ = "0.1.0"
