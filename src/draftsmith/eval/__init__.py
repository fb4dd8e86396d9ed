"""Benchmarks of drafts against plain decoding of the same target (`draftsmith eval`):
eval prompt sets (`datasets`), the interleaved decode runs (`runner`), τ / acceptance / speed
metrics (`metrics`), report.md with plots (`report`) and the command (`commands`)."""
