"""deltainf: find and remove poisoned training data with Delta-Influence."""
from deltainf.version import __version__

__all__ = ["__version__"]
