from django.contrib import admin

from billing.admin import UsdInputs
from gateway.models import Model, ModelAlias, Provider, Route


@admin.register(Provider)
class ProviderAdmin(admin.ModelAdmin):
    list_display = ("name", "kind", "base_url", "api_key_env", "is_active")
    list_filter = ("kind", "is_active")
    search_fields = ("name",)


class RouteInline(admin.TabularInline):
    model = Route
    extra = 0
    fields = (
        "position",
        "provider",
        "upstream_model",
        "weight",
        "connect_timeout_seconds",
        "first_byte_timeout_seconds",
        "idle_timeout_seconds",
    )


class ModelAliasInline(admin.TabularInline):
    model = ModelAlias
    extra = 0


@admin.register(Model)
class ModelAdmin(UsdInputs):
    list_display = (
        "name",
        "input_price_per_mtok_usd",
        "output_price_per_mtok_usd",
        "cached_input_price_per_mtok_usd",
        "routing",
        "is_active",
    )
    list_filter = ("is_active", "routing")
    search_fields = ("name", "aliases__name")
    inlines = (RouteInline, ModelAliasInline)
