"""`python -m bench.bare_proxy --port P --upstream URL`: the least an aiohttp proxy can do, for reference.

It reads the body, posts it upstream on a keep-alive session and answers with the upstream's bytes:
no parsing, no classification, no header filtering, no metrics. `bench.proxy_overhead` measures it
beside the sidecar, so what two loopback hops through Python cost on the machine is known apart
from what the sidecar adds on top.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

SESSION = web.AppKey("session", aiohttp.ClientSession)


def make_app(upstream: str) -> web.Application:
    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        app[SESSION] = aiohttp.ClientSession(upstream)
        yield
        await app[SESSION].close()

    async def forward(request: web.Request) -> web.Response:
        body = await request.read()
        async with app[SESSION].post(request.path, data=body, headers={"Content-Type": "application/json"}) as resp:
            return web.Response(status=resp.status, body=await resp.read(), content_type="application/json")

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/v1/chat/completions", forward)
    app.router.add_get("/health", health)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    web.run_app(make_app(args.upstream), host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
