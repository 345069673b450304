from django.contrib import admin
from django.urls import include, path, re_path
from django.utils.module_loading import import_string

from portal import api, health, token_views, views

urlpatterns = [
    path("", views.home, name="home"),
    path("accounts/", include("allauth.urls")),
    path("dashboard/", include("billing.urls")),
    path("dashboard/keys/create", views.api_key_create_view, name="api_key_create"),
    path(
        "dashboard/keys/<int:api_key_id>/revoke", views.api_key_revoke_view, name="api_key_revoke"
    ),
    path("stripe/", include("billing.webhook_urls")),
    path(
        "dashboard/keys/<int:api_key_id>/rename", views.api_key_rename_view, name="api_key_rename"
    ),
    path(
        "dashboard/keys/<int:api_key_id>/rotate", views.api_key_rotate_view, name="api_key_rotate"
    ),
    # Organisations, members and invitations (the current organisation: ?org= or the session).
    path("dashboard/orgs/", views.organizations, name="organizations"),
    path("dashboard/orgs/switch", views.organization_switch, name="organization_switch"),
    path("dashboard/org/", views.organization, name="organization"),
    path("dashboard/org/leave", views.organization_leave, name="organization_leave"),
    path("dashboard/org/invite", views.member_invite, name="member_invite"),
    path(
        "dashboard/org/invitations/<int:invitation_id>/revoke",
        views.invitation_revoke,
        name="invitation_revoke",
    ),
    path(
        "dashboard/org/members/<int:member_id>/role", views.member_change_role, name="member_role"
    ),
    path("dashboard/org/members/<int:member_id>/remove", views.member_remove, name="member_remove"),
    path(
        "dashboard/org/members/<int:member_id>/transfer",
        views.ownership_transfer,
        name="ownership_transfer",
    ),
    path("invitations/<str:token>/", views.invitation_answer, name="invitation_answer"),
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
    # /v1/* is not here: portal/asgi.py sends it to the gateway's own handler (gateway/asgi.py,
    # its paths in gateway/asgi_urls.py).
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    # The gateway's metrics page, named by path: portal does not import the layers above it.
    path("metrics", import_string("gateway.metrics.metrics_view"), name="metrics"),
]
