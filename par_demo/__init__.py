"""par-demo: PAR (Pruning All-Rounder) joint visual-token and layer pruning for LLaVA, with real speed-ups."""

__version__ = "0.1.0"
