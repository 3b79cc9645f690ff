"""An example third-party flywheel-middleware plugin package."""
