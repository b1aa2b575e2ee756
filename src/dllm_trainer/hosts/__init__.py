"""Host adapters: where a job runs and whom it reports to (standalone, Transformer Lab plugin)."""
