"""The command line of the bench's own ASGI apps (the ceilings, the pipe floor): ``--host``,
``--port``, then uvicorn with uvloop and httptools, logging off."""

from __future__ import annotations

import argparse
from typing import Any, Literal


def parser(doc: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    return p


def run(app: Any, args: argparse.Namespace, *, lifespan: Literal["auto", "on", "off"] = "off") -> None:
    import uvicorn

    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False, lifespan=lifespan)
