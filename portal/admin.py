from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.auth.admin import UserAdmin as DjangoUserAdmin
from django.core.exceptions import ValidationError
from django.db.models import QuerySet
from django.http import HttpRequest

from portal.management_tokens import (
    management_token_create,
    management_token_refusal,
    management_token_revoke,
)
from portal.models import ApiKey, Invitation, ManagementToken, Membership, Organization, User
from portal.services import api_key_revoke


@admin.register(User)
class UserAdmin(DjangoUserAdmin):
    ordering = ("email",)
    list_display = ("email", "name", "is_staff", "is_active", "date_joined")
    search_fields = ("email", "name")
    fieldsets = (
        (None, {"fields": ("email", "password")}),
        ("Profile", {"fields": ("name",)}),
        ("Permissions", {"fields": ("is_active", "is_staff", "is_superuser", "groups")}),
        ("Dates", {"fields": ("last_login", "date_joined")}),
    )
    add_fieldsets = ((None, {"classes": ("wide",), "fields": ("email", "password1", "password2")}),)


class MembershipFormSet(forms.BaseInlineFormSet):
    def clean(self) -> None:
        # Each row's own validation checks one_owner_per_org against the database only, so
        # two new owner rows in one save would both pass and the insert fail (a 500).
        super().clean()
        owners = [
            form
            for form in self.forms
            if form.cleaned_data.get("role") == Membership.Role.OWNER
            and not form.cleaned_data.get("DELETE")
        ]
        if len(owners) > 1:
            raise ValidationError("An organisation has one owner; make the others admins.")


class MembershipInline(admin.TabularInline):
    model = Membership
    formset = MembershipFormSet
    extra = 0
    autocomplete_fields = ("user",)


@admin.register(Organization)
class OrganizationAdmin(admin.ModelAdmin):
    list_display = ("slug", "name", "created_at")
    search_fields = ("slug", "name")
    prepopulated_fields = {"slug": ("name",)}
    inlines = (MembershipInline,)


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    """Keys are created through the CLI or dashboard (the secret is shown once there)."""

    list_display = ("prefix", "name", "organization", "created_at", "last_used_at", "revoked_at")
    list_filter = ("revoked_at",)
    search_fields = ("prefix", "name", "organization__slug")
    readonly_fields = (
        "prefix",
        "hashed_key",
        "created_by",
        "created_at",
        "last_used_at",
        "rotated_from",
    )
    fieldsets = (
        (
            None,
            {
                "fields": (
                    "organization",
                    "name",
                    "prefix",
                    "hashed_key",
                    "created_by",
                    "rotated_from",
                )
            },
        ),
        ("Use", {"fields": ("created_at", "last_used_at", "revoked_at")}),
        (
            "Limits (empty: none; the spend cap is under Billing › Spend caps)",
            {"fields": ApiKey.LIMIT_FIELDS},
        ),
    )

    actions = ("revoke_keys",)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    @admin.action(description="Revoke selected keys")
    def revoke_keys(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        for api_key in queryset:
            api_key_revoke(api_key=api_key)
        self.message_user(request, f"Revoked {queryset.count()} key(s).")


@admin.register(Invitation)
class InvitationAdmin(admin.ModelAdmin):
    """Invitations are sent from the organisation page (the token is only in the e-mail)."""

    list_display = ("email", "organization", "role", "state", "created_at", "expires_at")
    list_filter = ("state", "role")
    search_fields = ("email", "organization__slug")
    readonly_fields = ("hashed_token", "invited_by", "created_at", "answered_at")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False


class ManagementTokenAddForm(forms.ModelForm):
    """An operator creates a token on behalf of an owner or admin of the organisation."""

    class Meta:
        model = ManagementToken
        fields = ["organization", "created_by", "name", "role"]

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        organization, creator = data.get("organization"), data.get("created_by")
        if organization is None or creator is None:
            return data
        membership = Membership.objects.filter(organization=organization, user=creator).first()
        if membership is None:
            raise ValidationError("The creator must be a member of the organisation.")
        refusal = management_token_refusal(membership=membership, role=data.get("role", ""))
        if refusal:
            raise ValidationError(refusal[0].upper() + refusal[1:] + ".")
        return data


@admin.register(ManagementToken)
class ManagementTokenAdmin(admin.ModelAdmin):
    """Operators create tokens here (the secret is shown once, in the message after saving),
    see them and revoke them; owners and admins also create them on the dashboard."""

    list_display = (
        "prefix",
        "name",
        "organization",
        "role",
        "created_by",
        "last_used_at",
        "revoked_at",
    )
    list_filter = ("role", "revoked_at")
    search_fields = ("prefix", "name", "organization__slug", "created_by__email")
    readonly_fields = (
        "organization",
        "name",
        "prefix",
        "hashed_token",
        "role",
        "created_by",
        "created_at",
        "last_used_at",
        "revoked_at",
    )
    actions = ("revoke_tokens",)

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        return () if obj is None else self.readonly_fields

    def get_form(
        self, request: HttpRequest, obj: Any = None, change: bool = False, **kwargs: Any
    ) -> Any:
        if obj is None:
            kwargs["form"] = ManagementTokenAddForm
        return super().get_form(request, obj, change, **kwargs)

    def save_model(
        self, request: HttpRequest, obj: ManagementToken, form: Any, change: bool
    ) -> None:
        if change:
            return  # every field is read-only once created
        membership = Membership.objects.get(
            organization_id=obj.organization_id, user_id=obj.created_by_id
        )
        token, secret = management_token_create(membership=membership, name=obj.name, role=obj.role)
        obj.pk, obj.prefix, obj.hashed_token = token.pk, token.prefix, token.hashed_token
        self.message_user(
            request,
            f"Management token for {token.organization}: {secret} — copy it now, it is shown "
            "only this once.",
            messages.WARNING,
        )

    @admin.action(description="Revoke selected tokens")
    def revoke_tokens(self, request: HttpRequest, queryset: QuerySet[ManagementToken]) -> None:
        for token in queryset:
            management_token_revoke(token=token)
        self.message_user(request, f"Revoked {queryset.count()} token(s).")
