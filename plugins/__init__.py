"""Built-in plugins; they register through the same entry-point group a third party uses."""
