"""`wings serve`: an OpenAI-compatible server where image+text requests join a running batch, and its web page.

Needs the `serve` extra (FastAPI, uvicorn, the `openai` package's protocol types, prometheus-client):
`pip install 'wings-mllm[serve]'`.
"""

from .app import Server, ServerOptions, create_app
from .background import BackgroundServer
from .engine import ContinuousScheduler
from .inputs import ServedModel, ServingPolicy
from .scheduler import Scheduler, WaveScheduler

__all__ = ["BackgroundServer", "ContinuousScheduler", "Scheduler", "ServedModel", "Server", "ServerOptions",
           "ServingPolicy", "WaveScheduler", "create_app"]
