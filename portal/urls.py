from django.contrib import admin
from django.urls import include, path
from django.utils.module_loading import import_string

from portal import health, views

urlpatterns = [
    path("", views.home, name="home"),
    path("accounts/", include("allauth.urls")),
    path("dashboard/", include("billing.urls")),
    path("dashboard/keys/create", views.api_key_create_view, name="api_key_create"),
    path(
        "dashboard/keys/<int:api_key_id>/revoke", views.api_key_revoke_view, name="api_key_revoke"
    ),
    path("stripe/", include("billing.webhook_urls")),
    path("admin/", admin.site.urls),
    path("v1/", include("gateway.urls")),
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    # The gateway's metrics page, named by path: portal does not import the layers above it.
    path("metrics", import_string("gateway.metrics.metrics_view"), name="metrics"),
]
