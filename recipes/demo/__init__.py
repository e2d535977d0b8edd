"""Recipes that built the bundled demo model: its CLAP, its decoder and the chain of rounds between."""
