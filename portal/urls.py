from django.contrib import admin
from django.urls import include, path, re_path

from portal import api, token_views, views

urlpatterns = [
    path("", views.home, name="home"),
    path("accounts/", include("allauth.urls")),
    path("dashboard/", include("billing.urls")),
    path("dashboard/keys/create", views.api_key_create_view, name="api_key_create"),
    path(
        "dashboard/keys/<int:api_key_id>/revoke", views.api_key_revoke_view, name="api_key_revoke"
    ),
    path("dashboard/tokens", token_views.management_tokens_page, name="management_tokens"),
    path(
        "dashboard/tokens/<int:token_id>/revoke",
        token_views.management_token_revoke_view,
        name="management_token_revoke",
    ),
    path("admin/", admin.site.urls),
    path("api/v1/", include("portal.api_urls")),
    path("api/v1/", include("billing.api_urls")),
    re_path(r"^api/", api.UnknownEndpoint.as_view()),
    path("catalog/", include("gateway.pages")),
    path("v1/", include("gateway.urls")),
]
