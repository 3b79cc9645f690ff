"""``flywheel serve``: the ingestion API, the resolver over HTTP, and the dashboard on uvicorn."""

from __future__ import annotations

import click

from flywheel_middleware.cli.common import Cli, command, console


def register(main: click.Group) -> None:
    @command(main)
    @click.option("--port", "-p", default=8700, show_default=True, type=click.IntRange(0, 65535))
    @click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind.")
    @click.option(
        "--api-key",
        "api_keys",
        multiple=True,
        envvar=None,
        help="An API key for writes (repeatable; FLYWHEEL_API_KEYS and service.api_keys also count).",
    )
    @click.option(
        "--cors-origin",
        "cors_origins",
        multiple=True,
        help="An allowed browser origin (repeatable).",
    )
    @click.option("--log-level", default="warning", show_default=True)
    def serve(
        cli: Cli,
        port: int,
        host: str,
        api_keys: tuple[str, ...],
        cors_origins: tuple[str, ...],
        log_level: str,
    ) -> None:
        """Serve POST /v1/telemetry, POST /v1/feedback, GET /v1/config/{workflow}, /v1/health and
        the dashboard at /. OpenAPI at /docs and /openapi.json; the browser snippet at /flywheel.js."""
        try:
            import uvicorn

            from flywheel_middleware.service.app import create_app
        except ImportError as exc:
            raise click.ClickException(
                f"the service needs its extra: pip install 'flywheel-middleware[server]' ({exc})"
            ) from exc
        cli.activate_runtime()
        app = create_app(cli.config, api_keys=list(api_keys), cors_origins=list(cors_origins))
        settings = app.state.settings
        if not settings.api_keys:
            console.print(
                "[yellow]no API keys configured: writes will be refused (401). "
                "Set FLYWHEEL_API_KEYS, service.api_keys or --api-key.[/]"
            )
        console.print(f"flywheel service on http://{host}:{port}/  (store {cli.shown_url})")
        uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)
