"""The management API's portal endpoints, mounted under /api/v1/."""

from django.urls import path
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerView

from portal import api

ORG = "organizations/<slug:organization>"

urlpatterns = [
    path("organizations/", api.OrganizationList.as_view(), name="api_v1_organizations"),
    path(f"{ORG}/", api.OrganizationDetail.as_view(), name="api_v1_organization"),
    path(f"{ORG}/members/", api.MemberList.as_view(), name="api_v1_members"),
    path(f"{ORG}/members/<int:member_id>/", api.MemberDetail.as_view(), name="api_v1_member"),
    path(
        f"{ORG}/members/<int:member_id>/transfer-ownership/",
        api.OwnershipTransfer.as_view(),
        name="api_v1_ownership_transfer",
    ),
    path(f"{ORG}/invitations/", api.InvitationList.as_view(), name="api_v1_invitations"),
    path(
        f"{ORG}/invitations/<int:invitation_id>/revoke/",
        api.InvitationRevoke.as_view(),
        name="api_v1_invitation_revoke",
    ),
    path(f"{ORG}/keys/", api.ApiKeyList.as_view(), name="api_v1_keys"),
    path(f"{ORG}/keys/<int:key_id>/", api.ApiKeyDetail.as_view(), name="api_v1_key"),
    path(f"{ORG}/keys/<int:key_id>/revoke/", api.ApiKeyRevoke.as_view(), name="api_v1_key_revoke"),
    path(f"{ORG}/keys/<int:key_id>/rotate/", api.ApiKeyRotate.as_view(), name="api_v1_key_rotate"),
    path(f"{ORG}/tokens/", api.ManagementTokenList.as_view(), name="api_v1_tokens"),
    path(
        f"{ORG}/tokens/<int:token_id>/revoke/",
        api.ManagementTokenRevoke.as_view(),
        name="api_v1_token_revoke",
    ),
    path("schema/", SpectacularAPIView.as_view(), name="api_v1_schema"),
    path("docs/", SpectacularSwaggerView.as_view(url_name="api_v1_schema"), name="api_v1_docs"),
    path(
        "redoc/",
        # The library's page links Google Fonts; ours loads nothing from another host.
        SpectacularRedocView.as_view(url_name="api_v1_schema", template_name="portal/redoc.html"),
        name="api_v1_redoc",
    ),
]
