"""Small self-generated RL tasks used by the recipes, the demo and the tests (no dataset download).

May import `..tools` (parsers, for the answer format) and `..errors`; imported by nothing in the package.
"""
