"""The management API's billing endpoints, mounted under /api/v1/ (portal's: portal/api_urls.py)."""

from django.urls import path

from billing import api

ORG = "organizations/<slug:organization>"

urlpatterns = [
    path("key", api.CallingKey.as_view(), name="api_v1_calling_key"),
    path(f"{ORG}/balance/", api.Balance.as_view(), name="api_v1_balance"),
    path(f"{ORG}/usage/", api.Usage.as_view(), name="api_v1_usage"),
    path(f"{ORG}/requests/", api.RequestLog.as_view(), name="api_v1_requests"),
]
