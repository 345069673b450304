"""Forms of the organisation and key pages: they parse input; services decide."""

from __future__ import annotations

from typing import Any

from django import forms
from django.conf import settings

from portal.models import Membership


def _lines(value: str) -> list[str]:
    """Entries separated by newlines or commas."""
    return [item.strip() for item in value.replace(",", "\n").splitlines() if item.strip()]


class OrganizationCreateForm(forms.Form):
    name = forms.CharField(max_length=200)


class InvitationForm(forms.Form):
    email = forms.EmailField()
    role = forms.ChoiceField(
        choices=[(Membership.Role.MEMBER, "member"), (Membership.Role.ADMIN, "admin")]
    )


class RoleForm(forms.Form):
    role = forms.ChoiceField(
        choices=[(Membership.Role.MEMBER, "member"), (Membership.Role.ADMIN, "admin")]
    )


class ApiKeyRotateForm(forms.Form):
    # Bounded here as well as by the service: timedelta(hours=10**13) overflows.
    overlap_hours = forms.IntegerField(
        min_value=0,
        max_value=settings.API_KEY_MAX_ROTATION_OVERLAP_HOURS,
        initial=24,
        help_text="How long the old key keeps working, in hours.",
    )


class ApiKeyLimitsForm(forms.Form):
    """A key's limits kept by portal (empty: unlimited). Billing's page adds the spend cap."""

    expires_at = forms.DateTimeField(
        required=False,
        widget=forms.DateTimeInput(attrs={"type": "datetime-local"}, format="%Y-%m-%dT%H:%M"),
        help_text="UTC. Empty: never.",
    )
    requests_per_minute = forms.IntegerField(required=False, min_value=1)
    tokens_per_minute = forms.IntegerField(required=False, min_value=1)
    max_concurrent_requests = forms.IntegerField(required=False, min_value=1)
    allowed_models = forms.CharField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 2}),
        help_text="One model name per line; empty for every model.",
    )
    ip_allowlist = forms.CharField(
        required=False,
        label="IP allowlist",
        widget=forms.Textarea(attrs={"rows": 2}),
        help_text="One address or CIDR network per line (e.g. 203.0.113.0/24); empty for any.",
    )

    def clean_allowed_models(self) -> list[str]:
        return _lines(self.cleaned_data["allowed_models"])

    def clean_ip_allowlist(self) -> list[str]:
        return _lines(self.cleaned_data["ip_allowlist"])

    @classmethod
    def initial_for(cls, api_key: Any) -> dict[str, Any]:
        return {
            "expires_at": api_key.expires_at,
            "requests_per_minute": api_key.requests_per_minute,
            "tokens_per_minute": api_key.tokens_per_minute,
            "max_concurrent_requests": api_key.max_concurrent_requests,
            "allowed_models": "\n".join(api_key.allowed_models or []),
            "ip_allowlist": "\n".join(api_key.ip_allowlist or []),
        }
