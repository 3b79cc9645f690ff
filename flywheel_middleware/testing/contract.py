"""Adapter contract suite, shipped as a pytest plugin (entry point ``flywheel_contract``).

Loaded in every pytest run of a project that installs flywheel, so importing it must stay cheap
and it adds no tests unless a test module asks for the suite.
"""

from __future__ import annotations
