"""The shipped YAML recipes, installed as package data: ``importlib.resources.files("fairtune.configs")``."""
