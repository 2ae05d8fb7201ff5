"""forge report: reads a run directory, renders the success criteria and curves."""
