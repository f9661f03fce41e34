"""OpenAI-compatible HTTP server: continuous batching over one engine, API keys, metrics, a chat page.

    from inhouse import LLM
    from inhouse.server import create_app, serve
    serve(create_app(LLM(), api_keys=None), host="127.0.0.1", port=8000)

or, from the shell, ``inhouse serve [MODEL] --api-key-file keys.txt [--adapter NAME=DIR ...]``.
"""

from inhouse.server.app import create_app, serve, static_dir
from inhouse.server.auth import ApiKeys, KeyFileError

__all__ = ["create_app", "serve", "static_dir", "ApiKeys", "KeyFileError"]
