"""Optimizer checks (D1-D3, E1, G2)."""
from forge.checklist.registry import pending

pending("optim_routing", "needs the MuonGrokfast optimizer (issue #4)")
