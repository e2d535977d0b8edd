"""How the project's models were built; run from the repository root (see recipes/README.md). Not installed."""
