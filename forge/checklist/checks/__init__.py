"""Check implementations, one module per component. Importing this package registers them all."""
from forge.checklist.checks import config, data, memory, model, optim, observability, precision  # noqa: F401
