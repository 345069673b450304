"""The model catalog: providers, the models clients ask for, and the routes between them.

Loaded from a YAML file by `manage.py load_catalog` and editable in the admin. The gateway
reads it through a short per-process cache (selectors.catalog_snapshot).
"""

from __future__ import annotations

from django.db import models

from billing.money import ZERO_USD, usd_field


class Provider(models.Model):
    class Kind(models.TextChoices):
        OPENAI = "openai", "OpenAI-compatible"
        ANTHROPIC = "anthropic", "Anthropic Messages API"
        GEMINI = "gemini", "Google Gemini"
        DEMO = "demo", "Built-in demo (answers offline)"

    name = models.SlugField(max_length=100, unique=True)
    kind = models.CharField(max_length=16, choices=Kind.choices)
    base_url = models.URLField(max_length=500, blank=True)
    # The secret is never stored: this names the environment variable that holds it.
    api_key_env = models.CharField(max_length=100, blank=True)
    is_active = models.BooleanField(default=True)

    def __str__(self) -> str:
        return self.name


class Model(models.Model):
    """A model as clients name it, with its prices (USD per 1M tokens)."""

    name = models.CharField(max_length=200, unique=True)
    input_price_per_mtok_usd = usd_field()  # USD per 1M prompt tokens
    output_price_per_mtok_usd = usd_field()  # USD per 1M completion tokens
    cached_input_price_per_mtok_usd = usd_field(default=ZERO_USD)  # USD per 1M cached tokens
    # USD per 1M tokens written to the provider's prompt cache; empty: the input price.
    cache_write_price_per_mtok_usd = usd_field(null=True, blank=True)
    # The most completion tokens one request may ask for; also the worst case reserved when the
    # client sends no max_tokens.
    max_output_tokens = models.PositiveIntegerField(default=4096)
    # Tokens of prompt and completion together the model accepts; shown to clients.
    context_length = models.PositiveIntegerField(null=True, blank=True)
    is_active = models.BooleanField(default=True)

    def __str__(self) -> str:
        return self.name


class Route(models.Model):
    """One deployment that can serve a model: a provider and the provider's name for it."""

    model = models.ForeignKey(Model, on_delete=models.CASCADE, related_name="routes")
    provider = models.ForeignKey(Provider, on_delete=models.PROTECT, related_name="routes")
    upstream_model = models.CharField(max_length=200)
    position = models.PositiveSmallIntegerField(default=0, help_text="Tried in ascending order.")

    class Meta:
        ordering = ["model", "position"]
        constraints = [
            models.UniqueConstraint(fields=["model", "position"], name="one_route_per_position")
        ]

    def __str__(self) -> str:
        return f"{self.model} → {self.provider}/{self.upstream_model}"
