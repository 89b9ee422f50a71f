"""Data tools: synthetic datasets in VLMEvalKit's TSV format (no downloads)."""
