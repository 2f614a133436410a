"""fairtune.models."""
