"""The line engine: batches, stations and the per-unit print-and-verify loop."""
