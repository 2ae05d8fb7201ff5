"""Model checks (B1 budget overrun)."""
from forge.checklist.registry import pending

pending("param_budget", "needs the Phase 1 model (issue #3)")
