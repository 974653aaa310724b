"""Small self-generated RL tasks used by the recipes, the demo and the tests (no dataset download)."""
