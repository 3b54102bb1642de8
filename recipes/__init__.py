"""The shipped recipes (YAML), installed as datamanip.recipes."""
