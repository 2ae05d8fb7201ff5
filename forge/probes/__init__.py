"""Evaluation probes: what perplexity alone cannot show (samples, reasoning, long range, position, attention
maps), and text generation. `ProbeSuite(spec.probes, ...)` runs them at every evaluation; `generate`
samples from a model (forge sample)."""
from forge.probes.sampling import Generation, generate
from forge.probes.suite import ProbeSuite, observing

__all__ = ["Generation", "ProbeSuite", "generate", "observing"]
