"""Per-example memorization scores, representation probes and privacy metrics (issues 4 and 5)."""
