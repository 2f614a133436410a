"""fairtune.train."""
