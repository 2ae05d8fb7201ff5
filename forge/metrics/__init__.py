"""Metrics as data: the catalogue (checklists/metrics.toml), robust JSONL reading, and the one signal and
rule engine that the live monitors, `forge diagnose` and the success criteria share."""
