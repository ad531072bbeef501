"""Analysis entry points: `dashboard.py`, `plots.py`, `compare.py` (logic in `kvqueue`)."""
