"""forge diagnose: walk the debugging tree (checklists/diagnose.toml) over a run's record."""
