"""The `lakehouse` console command."""
