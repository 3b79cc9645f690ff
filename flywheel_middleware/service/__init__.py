"""The HTTP service: feedback and telemetry ingestion, config resolution, dashboard."""
