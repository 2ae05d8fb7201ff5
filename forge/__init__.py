"""forge: turn a declarative TOML experiment spec into a guarded Phase 1 training run."""

__version__ = "0.1.0"
