"""Executable checklists: TOML items (checklists/) that call registered checks (checks/)."""
