"""The offline demo: a LangChain support agent, simulated customers, the flywheel turning."""

from __future__ import annotations

from flywheel_middleware.demo.run import DemoResult, DemoSettings, render_summary, run_demo

__all__ = ["DemoResult", "DemoSettings", "render_summary", "run_demo"]
