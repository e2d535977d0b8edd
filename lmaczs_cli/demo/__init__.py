"""The demo: a synthetic sound world with ground truth (`world`) and the bundled demo model."""
