"""`wings serve`: an OpenAI-compatible server that batches concurrent image+text requests, and its web page.

Needs the `serve` extra (FastAPI, uvicorn, the `openai` package's protocol types):
`pip install 'wings-mllm[serve]'`.
"""

from .app import Server, ServerOptions, create_app
from .background import BackgroundServer
from .inputs import ServedModel, ServingPolicy
from .scheduler import Scheduler

__all__ = ["BackgroundServer", "Scheduler", "ServedModel", "Server", "ServerOptions", "ServingPolicy", "create_app"]
