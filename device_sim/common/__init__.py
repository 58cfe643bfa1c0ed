"""The bottom layer: helpers every other package may use; it imports nothing else of the project."""
