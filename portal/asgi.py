"""The ASGI entry point: `uvicorn portal.asgi:application` serves the dashboard and `/v1/*`.

`/v1/*` (and `/v1`, for its 404 in OpenAI's shape) goes to the gateway's middleware-free
handler (gateway/asgi.py explains why); everything else to Django's full stack. This module is
the project's composition root, so it names the gateway's handler by import path rather than
importing up a layer.
"""

import gc
import os
from typing import Any

import django
from django.core.asgi import get_asgi_application
from django.utils.module_loading import import_string

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")

django.setup(set_prefix=False)
_site = get_asgi_application()
_gateway = import_string("gateway.asgi.GatewayASGIHandler")()
_v1 = import_string("gateway.capacity.ProcessCapacity")(_gateway)
# Probes and the scraper skip the site's middleware too (no sessions, no host check: a load
# balancer probes by address).
_BARE = frozenset({"/healthz", "/readyz", "/metrics"})
# What start-up loaded (modules, settings, URLconfs, the ORM's models) lives as long as the
# process: frozen, the garbage collector's full passes no longer walk it on every request's
# allocations (issue 7: a full pass showed up as ~5% of the gateway's CPU samples).
gc.freeze()
# A young-generation pass every 700 net allocations (the default) ran ~50 times a second at
# c=64, 0.7 ms each: 4% of the gateway's CPU, for almost no garbage (the request path frees
# by reference counting; at 20,000, one pass ran in 6,000 requests). Older passes keep their
# defaults.
gc.set_threshold(20_000, *gc.get_threshold()[1:])


async def application(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "http" and (scope["path"].startswith("/v1/") or scope["path"] == "/v1"):
        await _v1(scope, receive, send)
    elif scope["type"] == "http" and scope["path"] in _BARE:
        await _gateway(scope, receive, send)
    else:
        await _site(scope, receive, send)
