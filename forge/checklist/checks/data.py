"""Data checks (A2 data quality)."""
from forge.checklist.registry import pending

pending("data_sources", "needs the data pipeline (issue #5)")
