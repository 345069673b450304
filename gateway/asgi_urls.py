"""The URLconf of the gateway's own handler (gateway/asgi.py): only the paths portal/asgi.py
sends it (`/v1/*`, the probes and the metrics page), as the site's URLconf names them.

Resolving `/v1/*` against the site's whole URLconf tried every dashboard, account, admin and
API pattern first: about 5% of the gateway's CPU per request in issue 7's profile.
"""

from django.urls import include, path

from gateway.metrics import metrics_view
from portal import health

urlpatterns = [
    path("v1/", include("gateway.urls")),
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("metrics", metrics_view, name="metrics"),
]
