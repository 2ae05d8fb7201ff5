"""forge compare: variants of a spec trained against each other on one machine, judged at equal tokens or equal
training time (plan: the variants; budget; run: the scheduler; view: the table, curves, JSON and HTML that
`forge report A B ...` shows too)."""
