"""MLflow tracking of searches: a parent run per search, a child run per candidate, the Pareto front,
hypervolume and plots (``tracker``); gene summaries and param flattening (``summary``); pictures
(``plots``); where the store is (``store``); the local UI server behind ``evomerge ui`` (``server``).

Importing this package does not import MLflow; the tracker does when it starts.
"""

from evomerge.tracking.store import default_tracking_uri, resolve_tracking_uri
from evomerge.tracking.tracker import Tracker

__all__ = ["Tracker", "default_tracking_uri", "resolve_tracking_uri"]
