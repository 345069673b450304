from django.contrib import admin
from django.contrib.auth.admin import UserAdmin as DjangoUserAdmin
from django.db.models import QuerySet
from django.http import HttpRequest

from portal.management_tokens import management_token_revoke
from portal.models import ApiKey, ManagementToken, Membership, Organization, User
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


class MembershipInline(admin.TabularInline):
    model = Membership
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
    readonly_fields = ("prefix", "hashed_key", "created_by", "created_at", "last_used_at")
    fieldsets = (
        (None, {"fields": ("organization", "name", "prefix", "hashed_key", "created_by")}),
        ("Use", {"fields": ("created_at", "last_used_at", "revoked_at")}),
        (
            "Limits (empty: none; the spend cap is under Billing › Spend caps)",
            {
                "fields": (
                    "expires_at",
                    "allowed_models",
                    "requests_per_minute",
                    "tokens_per_minute",
                    "max_concurrent_requests",
                )
            },
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


@admin.register(ManagementToken)
class ManagementTokenAdmin(admin.ModelAdmin):
    """Tokens are created on the dashboard (Management tokens) or through the API, where the
    secret is shown once; here operators see and revoke them."""

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

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    @admin.action(description="Revoke selected tokens")
    def revoke_tokens(self, request: HttpRequest, queryset: QuerySet[ManagementToken]) -> None:
        for token in queryset:
            management_token_revoke(token=token)
        self.message_user(request, f"Revoked {queryset.count()} token(s).")
