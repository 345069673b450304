"""The model catalog: providers, the models clients ask for, and the routes between them.

Loaded from a YAML file by `manage.py load_catalog` and editable in the admin. The gateway
reads it through a short per-process cache (selectors.catalog_snapshot).
"""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.db import models

from billing.money import NOT_NEGATIVE, ZERO_USD, usd_field


def positive_seconds(value: float) -> None:
    """A route's timeout, refused at 0 or below as the catalog loader refuses it: the HTTP
    client reads such a timeout as none, so a hung provider would hold requests forever."""
    if value <= 0:
        raise ValidationError("Enter a positive number of seconds.", code="min_value")


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

    class Routing(models.TextChoices):
        ORDERED = "ordered", "In order (failover)"
        WEIGHTED = "weighted", "By weight (load balancing), then in order"

    name = models.CharField(max_length=200, unique=True)
    input_price_per_mtok_usd = usd_field(validators=NOT_NEGATIVE)  # USD per 1M prompt tokens
    output_price_per_mtok_usd = usd_field(validators=NOT_NEGATIVE)  # USD per 1M completion tokens
    cached_input_price_per_mtok_usd = usd_field(
        default=ZERO_USD, validators=NOT_NEGATIVE
    )  # USD per 1M cached tokens
    # USD per 1M tokens written to the provider's prompt cache; empty: the input price.
    cache_write_price_per_mtok_usd = usd_field(null=True, blank=True, validators=NOT_NEGATIVE)
    # The most completion tokens one request may ask for; also the worst case reserved when the
    # client sends no max_tokens.
    max_output_tokens = models.PositiveIntegerField(default=4096)
    # Input tokens reserved for each image a request sends: the most the provider bills for one
    # (about 1,100 for a high-detail image on most vision models; gpt-4o-mini bills ~48,000).
    image_input_tokens = models.PositiveIntegerField(default=2000)
    # Tokens of prompt and completion together the model accepts; shown to clients.
    context_length = models.PositiveIntegerField(null=True, blank=True)
    routing = models.CharField(
        max_length=10,
        choices=Routing.choices,
        default=Routing.ORDERED,
        help_text="Ordered: the first route serves, the others are fallbacks. Weighted: the "
        "first route is drawn by weight among the serveable ones, the rest follow in order.",
    )
    is_active = models.BooleanField(default=True)

    def __str__(self) -> str:
        return self.name


class Route(models.Model):
    """One deployment that can serve a model: a provider and the provider's name for it."""

    model = models.ForeignKey(Model, on_delete=models.CASCADE, related_name="routes")
    provider = models.ForeignKey(Provider, on_delete=models.PROTECT, related_name="routes")
    upstream_model = models.CharField(max_length=200)
    position = models.PositiveSmallIntegerField(default=0, help_text="Tried in ascending order.")
    # Share of first attempts under weighted routing (0: only ever a fallback).
    weight = models.PositiveIntegerField(default=1)
    # Upstream timeouts in seconds; empty: the GATEWAY_*_TIMEOUT_SECONDS defaults.
    connect_timeout_seconds = models.FloatField(
        null=True, blank=True, validators=[positive_seconds]
    )
    # Until the provider's answer starts (the whole answer, when not streamed); then fails over.
    first_byte_timeout_seconds = models.FloatField(
        null=True, blank=True, validators=[positive_seconds]
    )
    # Longest silence between two chunks of a stream; then the stream ends as interrupted.
    idle_timeout_seconds = models.FloatField(null=True, blank=True, validators=[positive_seconds])

    class Meta:
        ordering = ["model", "position"]
        constraints = [
            models.UniqueConstraint(fields=["model", "position"], name="one_route_per_position")
        ]

    def __str__(self) -> str:
        return f"{self.model} → {self.provider}/{self.upstream_model}"


class ModelAlias(models.Model):
    """Another name clients may use for a model (e.g. `gpt-4o` for `gpt-4o-2024-08-06`).

    Requests, keys' allowed models and usage records all use the model's own name.
    """

    name = models.CharField(max_length=200, unique=True)
    model = models.ForeignKey(Model, on_delete=models.CASCADE, related_name="aliases")

    class Meta:
        verbose_name_plural = "model aliases"

    def __str__(self) -> str:
        return f"{self.name} → {self.model}"
