"""Test helpers shipped with the package (the adapter contract suite as a pytest plugin)."""
