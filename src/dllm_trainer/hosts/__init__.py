"""Host adapters: where a job runs and whom it reports to (standalone, Transformer Lab v0.30.x plugin,
current Transformer Lab task)."""
