"""Switchboard's one settings module.

Every knob comes from an environment variable with a safe local default (the embedded
mode of `make run`: SQLite, in-process cache, filesystem Celery broker). A bad value fails
at start-up with a message naming the variable. Each variable is documented in the README.
"""

from __future__ import annotations

import os
from decimal import Decimal, InvalidOperation
from pathlib import Path
from urllib.parse import urlsplit

import dj_database_url
from django.core.exceptions import ImproperlyConfigured
from redis.backoff import NoBackoff
from redis.retry import Retry

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("SWITCHBOARD_VAR_DIR", BASE_DIR / "var"))


def env_str(name: str, default: str) -> str:
    return os.environ.get(name, default)


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in {"1", "true", "yes", "on"}:
        return True
    if raw.lower() in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name} must be a boolean (true/false), got {raw!r}")


def env_int(name: str, default: int, *, minimum: int = 0) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ImproperlyConfigured(f"{name} must be >= {minimum}, got {value}")
    return value


def env_decimal(name: str, default: str) -> Decimal:
    raw = os.environ.get(name) or default
    try:
        return Decimal(raw)
    except InvalidOperation:
        raise ImproperlyConfigured(f"{name} must be a decimal number, got {raw!r}") from None


def env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in env_str(name, default).split(",") if item.strip()]


def env_origins(name: str, default: str) -> tuple[str, ...]:
    """`*`, or a comma-separated list of web origins (scheme and host, no path)."""
    origins = tuple(env_list(name, default))
    for origin in origins:
        parts = urlsplit(origin)
        if origin != "*" and (
            parts.scheme not in {"http", "https"}
            or not parts.netloc
            or f"{parts.scheme}://{parts.netloc}" != origin
        ):
            raise ImproperlyConfigured(
                f"{name} must be * or origins such as https://app.example.com (scheme and "
                f"host, no path), got {origin!r}"
            )
    if "*" in origins and len(origins) > 1:
        raise ImproperlyConfigured(f"{name} is either * or a list of origins, not both")
    return origins


DEBUG = env_bool("DEBUG", True)
SECRET_KEY = env_str("SECRET_KEY", "")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("SECRET_KEY must be set when DEBUG is off")
    SECRET_KEY = "insecure-local-development-key-do-not-use-in-production"  # noqa: S105
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "127.0.0.1,localhost" if DEBUG else "")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "servestatic.runserver_nostatic",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "allauth",
    "allauth.account",
    "allauth.mfa",
    "portal",
    "billing",
    "gateway",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "portal.logs.request_id_middleware",
    "servestatic.middleware.ServeStaticMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "allauth.account.middleware.AccountMiddleware",
]

ROOT_URLCONF = "portal.urls"
ASGI_APPLICATION = "portal.asgi.application"
WSGI_APPLICATION = "portal.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "portal.context_processors.organization_switcher",
            ],
        },
    },
]

# SQLite by default (embedded mode); DATABASE_URL selects PostgreSQL in production and tests.
DATABASE_URL = env_str("DATABASE_URL", f"sqlite:///{VAR_DIR / 'db.sqlite3'}")
try:
    DATABASES = {
        "default": dj_database_url.parse(
            DATABASE_URL,
            # Seconds a connection is kept for reuse. 0 (close after each request) by default:
            # Django's ASGI handler runs each request's database work in a thread of its own,
            # so kept connections would belong to threads that are gone.
            conn_max_age=env_int("DATABASE_CONN_MAX_AGE", 0),
            conn_health_checks=True,
        )
    }
except ValueError as exc:
    raise ImproperlyConfigured(f"DATABASE_URL is not a valid database URL: {exc}") from None
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql" and env_bool(
    "DATABASE_POOL", True
):
    # Django's ASGI handler runs each request's database work in a new thread, so without a
    # pool every request opens a connection (measured: the reservation took 12 ms, 3.6 ms with
    # the pool). Django requires CONN_MAX_AGE = 0 with a pool.
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": 2,
        "max_size": env_int("DATABASE_POOL_MAX_SIZE", 20, minimum=1),
        "timeout": env_int("DATABASE_POOL_TIMEOUT_SECONDS", 30, minimum=1),
    }
# The request path's two statements (billing/hot_path_sql.py) are prepared once per connection
# and then only executed: PostgreSQL planned them for longer than it ran them. Turn off behind a
# pooler that does not keep a session's prepared statements (PgBouncer in transaction mode).
DATABASE_PREPARED_STATEMENTS = env_bool("DATABASE_PREPARED_STATEMENTS", True)
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Concurrent gateway requests write usage while others read: WAL and a busy timeout
    # keep SQLite from answering "database is locked" in the embedded mode.
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 20,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Redis, when given, backs the shared cache (and later the per-key limits); without it the
# cache is in-process, which is only correct for the single-process embedded mode.
REDIS_URL = env_str("REDIS_URL", "")
if REDIS_URL:
    CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

AUTH_USER_MODEL = "portal.User"
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

AUTHENTICATION_BACKENDS = [
    # The admin's login (by e-mail, the USERNAME_FIELD) and allauth's (verified e-mail, rate
    # limited) both end in the same user.
    "django.contrib.auth.backends.ModelBackend",
    "allauth.account.auth_backends.AuthenticationBackend",
]

# Accounts (django-allauth): log in by e-mail, no usernames; an address must be verified
# before its user can log in. The personal organisation is made on sign-up (portal.signals).
ACCOUNT_USER_MODEL_USERNAME_FIELD = None
ACCOUNT_LOGIN_METHODS = {"email"}
ACCOUNT_SIGNUP_FIELDS = ["email*", "password1*", "password2*"]
ACCOUNT_UNIQUE_EMAIL = True
ACCOUNT_EMAIL_VERIFICATION = "mandatory"
# Confirming the address (a POST from the link's page, so mail scanners cannot) logs in.
ACCOUNT_LOGIN_ON_EMAIL_CONFIRMATION = True
# Counted in the Django cache (Redis when REDIS_URL is set, so shared by every process); the
# other actions (sign-up, password reset, …) keep allauth's defaults.
ACCOUNT_RATE_LIMITS = {
    "login": "30/m/ip",
    # Per client address, and per e-mail address tried (slows guessing one account's password).
    "login_failed": "10/m/ip,5/5m/key",
}
# Optional two-factor authentication (allauth.mfa): a user turns TOTP on under /accounts/2fa/;
# recovery codes come with it. Logging in then asks for the code after the password.
MFA_SUPPORTED_TYPES = ["totp", "recovery_codes"]
MFA_TOTP_ISSUER = env_str("MFA_TOTP_ISSUER", "Switchboard")

LOGIN_URL = "account_login"
LOGIN_REDIRECT_URL = "dashboard"
ACCOUNT_LOGOUT_REDIRECT_URL = "home"

# E-mail: printed to the console unless EMAIL_HOST names an SMTP server.
EMAIL_HOST = env_str("EMAIL_HOST", "")
EMAIL_PORT = env_int("EMAIL_PORT", 587, minimum=1)
EMAIL_HOST_USER = env_str("EMAIL_HOST_USER", "")
EMAIL_HOST_PASSWORD = env_str("EMAIL_HOST_PASSWORD", "")
EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS", True)
DEFAULT_FROM_EMAIL = env_str("DEFAULT_FROM_EMAIL", "Switchboard <noreply@localhost>")
EMAIL_BACKEND = (
    "django.core.mail.backends.smtp.EmailBackend"
    if EMAIL_HOST
    else "django.core.mail.backends.console.EmailBackend"
)

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "servestatic.storage.CompressedStaticFilesStorage"},
}

# Celery: an embedded broker on the filesystem unless CELERY_BROKER_URL names a server.
CELERY_BROKER_URL = env_str("CELERY_BROKER_URL", "filesystem://")
CELERY_BROKER_DIR = VAR_DIR / "celery"
CELERY_BROKER_TRANSPORT_OPTIONS = (
    {
        "data_folder_in": str(CELERY_BROKER_DIR / "queue"),
        "data_folder_out": str(CELERY_BROKER_DIR / "queue"),
        "processed_folder": str(CELERY_BROKER_DIR / "processed"),
        "store_processed": False,
    }
    if CELERY_BROKER_URL.startswith("filesystem://")
    else {}
)
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_IGNORE_RESULT = True
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celerybeat-schedule")
CELERY_BEAT_SCHEDULE = {
    "sweep-stale-reservations": {"task": "billing.sweep_stale_reservations", "schedule": 60.0},
    "start-auto-topups": {"task": "billing.start_auto_topups", "schedule": 60.0},
    "retry-stripe-events": {"task": "billing.retry_stripe_events", "schedule": 300.0},
}

# Statements, usage rollups and billing alerts (billing/statements.py, rollups.py, alerts.py).
# A day or month is summed only this many seconds after it ends, so that requests settling
# across midnight have committed.
BILLING_PERIOD_GRACE_SECONDS = env_int("BILLING_PERIOD_GRACE_SECONDS", 900)
# A statement e-mail claimed this long ago but not sent (its worker died) is sent again.
BILLING_STATEMENT_EMAIL_RETRY_SECONDS = env_int(
    "BILLING_STATEMENT_EMAIL_RETRY_SECONDS", 3600, minimum=60
)
# Low-balance alert threshold (USD) for organisations that set none of their own.
BILLING_LOW_BALANCE_THRESHOLD_USD = env_decimal("BILLING_LOW_BALANCE_THRESHOLD_USD", "5")
# A key's spend-cap alert fires when its window's spend reaches this percentage of the cap.
BILLING_SPEND_CAP_ALERT_PERCENT = env_int("BILLING_SPEND_CAP_ALERT_PERCENT", 100, minimum=1)
BILLING_ALERTS_CHECK_SECONDS = env_int("BILLING_ALERTS_CHECK_SECONDS", 60, minimum=10)
CELERY_BEAT_SCHEDULE |= {
    "roll-up-usage": {"task": "billing.roll_up_usage", "schedule": 600.0},
    "issue-monthly-statements": {"task": "billing.issue_monthly_statements", "schedule": 3600.0},
    "check-billing-alerts": {
        "task": "billing.check_billing_alerts",
        "schedule": float(BILLING_ALERTS_CHECK_SECONDS),
    },
}

# A reservation still held after this many seconds belongs to a dead process and is swept.
# It must exceed the longest request; a request that outlives it is still charged in full
# when it settles (only its hold was released early).
BILLING_RESERVATION_SWEEP_AFTER_SECONDS = env_int(
    "BILLING_RESERVATION_SWEEP_AFTER_SECONDS", 900, minimum=60
)

# Stripe (used by billing's top-ups; STRIPE_API_BASE points the SDK at a fake in tests).
STRIPE_SECRET_KEY = env_str("STRIPE_SECRET_KEY", "")
STRIPE_PUBLISHABLE_KEY = env_str("STRIPE_PUBLISHABLE_KEY", "")
STRIPE_WEBHOOK_SECRET = env_str("STRIPE_WEBHOOK_SECRET", "")
STRIPE_API_BASE = env_str("STRIPE_API_BASE", "https://api.stripe.com")
STRIPE_JS_URL = env_str("STRIPE_JS_URL", "https://js.stripe.com/v3/")
# Seconds a webhook signature's timestamp may be from now, either way (older or newer: 400).
STRIPE_WEBHOOK_TOLERANCE_SECONDS = env_int("STRIPE_WEBHOOK_TOLERANCE_SECONDS", 300, minimum=1)
# The "Add credit" page: preset amounts and the bounds of a custom amount, in USD.
BILLING_TOPUP_PRESETS_USD = env_list("BILLING_TOPUP_PRESETS_USD", "10,25,50,100")
for _preset in BILLING_TOPUP_PRESETS_USD:
    try:
        Decimal(_preset)
    except InvalidOperation:
        raise ImproperlyConfigured(
            f"BILLING_TOPUP_PRESETS_USD: not an amount: {_preset!r}"
        ) from None
BILLING_TOPUP_MIN_USD = env_decimal("BILLING_TOPUP_MIN_USD", "5")
BILLING_TOPUP_MAX_USD = env_decimal("BILLING_TOPUP_MAX_USD", "1000")
if not Decimal("0.50") <= BILLING_TOPUP_MIN_USD <= BILLING_TOPUP_MAX_USD:
    # Stripe charges at least 0.50 USD.
    raise ImproperlyConfigured("need 0.50 <= BILLING_TOPUP_MIN_USD <= BILLING_TOPUP_MAX_USD")
# Auto top-up is switched off after this many consecutive failed charges.
BILLING_AUTO_TOPUP_MAX_FAILURES = env_int("BILLING_AUTO_TOPUP_MAX_FAILURES", 3, minimum=1)
# An auto top-up with no webhook answer after this many seconds no longer blocks the next one.
BILLING_AUTO_TOPUP_STALE_SECONDS = env_int("BILLING_AUTO_TOPUP_STALE_SECONDS", 3600, minimum=60)

# Gateway knobs.
# How long a key lookup is cached in each process; revocation takes effect within this bound.
GATEWAY_KEY_CACHE_SECONDS = env_int("GATEWAY_KEY_CACHE_SECONDS", 5)
# How long the model catalog is cached in each process before it is re-read.
GATEWAY_CATALOG_CACHE_SECONDS = env_int("GATEWAY_CATALOG_CACHE_SECONDS", 5)
# Largest accepted request body, in bytes.
GATEWAY_MAX_BODY_BYTES = env_int("GATEWAY_MAX_BODY_BYTES", 8 * 1024 * 1024, minimum=1024)
# Django refuses larger bodies before any view runs; keep it in step with the gateway's cap.
DATA_UPLOAD_MAX_MEMORY_SIZE = GATEWAY_MAX_BODY_BYTES
# Browser origins that may call /v1/* (CORS, gateway/cors.py): `*` (any: keys are bearer
# tokens, never cookies, so no site can borrow a visitor's credentials), a comma-separated list
# of origins (`https://app.example.com`), or empty to answer no CORS at all.
GATEWAY_CORS_ALLOWED_ORIGINS = env_origins("GATEWAY_CORS_ALLOWED_ORIGINS", "*")
# How many of a model's routes one request may try (failing over on connect errors, 5xx, 429).
GATEWAY_MAX_ATTEMPTS = env_int("GATEWAY_MAX_ATTEMPTS", 3, minimum=1)
# Upstream timeouts, in seconds.
GATEWAY_CONNECT_TIMEOUT_SECONDS = env_int("GATEWAY_CONNECT_TIMEOUT_SECONDS", 10, minimum=1)
GATEWAY_READ_TIMEOUT_SECONDS = env_int("GATEWAY_READ_TIMEOUT_SECONDS", 600, minimum=1)
# Longest silence between two chunks of a stream before it is ended as interrupted (a route's
# `timeouts.idle` overrides it, as `timeouts.connect` and `timeouts.first_byte` override the two
# above).
GATEWAY_IDLE_TIMEOUT_SECONDS = env_int("GATEWAY_IDLE_TIMEOUT_SECONDS", 120, minimum=1)
# A 429 or 503 whose Retry-After asks for at most this many seconds is retried on the same
# route after that wait; a longer wait fails over to the next route instead.
GATEWAY_MAX_RETRY_AFTER_SECONDS = env_int("GATEWAY_MAX_RETRY_AFTER_SECONDS", 2, minimum=0)
# A route that failed this many times in a row (before its first byte: unreachable, timed out,
# 5xx, 429) is tried after the model's other routes for the next GATEWAY_ROUTE_COOLDOWN_SECONDS
# (0: never). Each gateway process keeps this in memory, from its own requests.
GATEWAY_ROUTE_FAILURES_BEFORE_COOLDOWN = env_int(
    "GATEWAY_ROUTE_FAILURES_BEFORE_COOLDOWN", 3, minimum=1
)
GATEWAY_ROUTE_COOLDOWN_SECONDS = env_int("GATEWAY_ROUTE_COOLDOWN_SECONDS", 30, minimum=0)

# Production hardening (`python manage.py check --deploy` is clean with DEBUG off). Each knob
# defaults to the safe production value when DEBUG is off and to plain HTTP in development.
# Behind a proxy or load balancer that terminates TLS, set SECURE_PROXY_SSL_HEADER to the
# header it sets (usually X-Forwarded-Proto) so Django knows the request came over HTTPS.
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", not DEBUG)
# Probes and the scraper talk plain HTTP to the process on the private network.
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]
_PROXY_SSL_HEADER = env_str("SECURE_PROXY_SSL_HEADER", "")
if _PROXY_SSL_HEADER:
    SECURE_PROXY_SSL_HEADER = (
        "HTTP_" + _PROXY_SSL_HEADER.upper().replace("-", "_"),
        "https",
    )
SESSION_COOKIE_SECURE = env_bool("SECURE_COOKIES", not DEBUG)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 0 if DEBUG else 31_536_000)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", not DEBUG)
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", not DEBUG)
# Origins (scheme and host) allowed to POST forms, e.g. https://switchboard.example.com.
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", "")

# The management API (/api/v1/): the dashboard's session, or an organisation's management
# token (`Bearer sbm_…`) for scripts. Browsable only as JSON; the docs page is drf-spectacular's.
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "portal.api_auth.ManagementTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
}

# OpenAPI schema and docs pages; Swagger UI and ReDoc are served from the app (the sidecar
# package's static files), never from a CDN.
SPECTACULAR_SETTINGS = {
    "TITLE": "Switchboard management API",
    "DESCRIPTION": "Organisations, members, API keys, usage, the request log and the balance.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SCHEMA_PATH_PREFIX": "/api/v1/",
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    # The schema and docs describe the API, not anyone's data: readable without logging in.
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
}
SPECTACULAR_SETTINGS["DESCRIPTION"] = (
    "Organisations, members, invitations, API keys (limits, spend caps, rotation), usage, the "
    "request log, the balance and statements."
)
# One name per set of roles: every role, and the ones an invitation or role change may give.
SPECTACULAR_SETTINGS["ENUM_NAME_OVERRIDES"] = {
    "RoleEnum": "portal.models.Membership.Role",
    "GrantableRoleEnum": [("member", "member"), ("admin", "admin")],
}

# Logs: `text` for a terminal, `json` (one object a line) for a log shipper; both carry the
# request id (portal/logs.py).
LOG_FORMAT = env_str("LOG_FORMAT", "text")
if LOG_FORMAT not in {"text", "json"}:
    raise ImproperlyConfigured(f"LOG_FORMAT must be text or json, got {LOG_FORMAT!r}")
# Organisations: how long an invitation's accept link stays valid, in days.
INVITATION_VALID_DAYS = env_int("INVITATION_VALID_DAYS", 7, minimum=1)
# The longest overlap a key rotation may give the old key, in hours.
API_KEY_MAX_ROTATION_OVERLAP_HOURS = env_int("API_KEY_MAX_ROTATION_OVERLAP_HOURS", 720, minimum=1)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"request_id": {"()": "portal.logs.RequestIdFilter"}},
    "formatters": {
        "text": {"format": "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"},
        "json": {"()": "portal.logs.JsonFormatter"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": LOG_FORMAT,
            "filters": ["request_id"],
        }
    },
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    # httpx logs every request with its URL at INFO: upstream URLs stay out of the logs.
    "loggers": {
        "httpx": {"level": "WARNING"},
        "httpcore": {"level": "WARNING"},
        # uvicorn configures its own loggers before Django starts; these put its lines in the
        # same format as ours (its access lines only when it writes them: configure_logging).
        "uvicorn": {"handlers": ["console"], "propagate": False},
        "uvicorn.error": {"handlers": [], "propagate": True},
        "uvicorn.access": {"handlers": ["console"], "propagate": False},
    },
}
LOGGING_CONFIG = "portal.logs.configure_logging"
# Celery's worker and beat log through the LOGGING above instead of replacing it.
CELERY_WORKER_HIJACK_ROOT_LOGGER = False

# Probes and metrics (portal/health.py, gateway/metrics.py).
# How long /readyz waits for each dependency before calling it unreachable.
READINESS_TIMEOUT_SECONDS = env_int("READINESS_TIMEOUT_SECONDS", 2, minimum=1)
# The bearer token /metrics requires; unset, /metrics answers 404.
METRICS_TOKEN = env_str("METRICS_TOKEN", "")
# Concurrent /v1/* requests one process serves (a stream counts for as long as it flows);
# past it the process answers 503 at once (gateway/capacity.py).
GATEWAY_MAX_REQUESTS_PER_PROCESS = env_int("GATEWAY_MAX_REQUESTS_PER_PROCESS", 1000, minimum=1)
# Threads one process runs the request path's database calls in (gateway/database.py); each
# holds at most one database connection at a time (keep it below DATABASE_POOL_MAX_SIZE).
GATEWAY_DATABASE_THREADS = env_int("GATEWAY_DATABASE_THREADS", 8, minimum=1)
# Upstream connections one process keeps open at most (httpx's pool, shared by all providers).
GATEWAY_UPSTREAM_MAX_CONNECTIONS = env_int("GATEWAY_UPSTREAM_MAX_CONNECTIONS", 1000, minimum=1)
if GATEWAY_MAX_REQUESTS_PER_PROCESS > GATEWAY_UPSTREAM_MAX_CONNECTIONS:
    # A request holds at most one upstream connection at a time: with the pool at least as
    # large as the cap, no request ever waits for a connection.
    raise ImproperlyConfigured(
        "GATEWAY_MAX_REQUESTS_PER_PROCESS must not exceed GATEWAY_UPSTREAM_MAX_CONNECTIONS"
    )

# Redis clients (the cache, the rate limits, the settlement spool, the probes): seconds to
# connect and to wait for an answer, and one immediate retry (a pooled connection that a Redis
# restart closed is replaced on the spot). redis-py's default of ten retries with backoff held
# requests for up to 11 s while Redis restarted; with these, a request whose key has limits
# answers 503 within about twice the timeouts and the next one after Redis returns is served.
REDIS_CONNECT_TIMEOUT_SECONDS = float(env_decimal("REDIS_CONNECT_TIMEOUT_SECONDS", "0.5"))
REDIS_READ_TIMEOUT_SECONDS = float(env_decimal("REDIS_READ_TIMEOUT_SECONDS", "0.5"))
if not (0 < REDIS_CONNECT_TIMEOUT_SECONDS <= 30 and 0 < REDIS_READ_TIMEOUT_SECONDS <= 30):
    raise ImproperlyConfigured("REDIS_*_TIMEOUT_SECONDS must be more than 0 and at most 30")
if REDIS_URL:
    CACHES["default"]["OPTIONS"] = {  # type: ignore[assignment]  # CACHES' values are str
        "socket_connect_timeout": REDIS_CONNECT_TIMEOUT_SECONDS,
        "socket_timeout": REDIS_READ_TIMEOUT_SECONDS,
        "retry": Retry(NoBackoff(), 1),
    }

# Settlement when the database is down (billing/settlement_spool.py, gateway/settlement.py).
# A settlement the database cannot take (unreachable, or no pooled connection free) is retried
# with backoff until the request has waited this many seconds for it, then written to the
# spool: a Redis list, or files in BILLING_SETTLEMENT_SPOOL_DIR when Redis is down too. It
# bounds how long a client waits for its answer (a stream: its last events) during an outage.
# The process replays its spool every BILLING_SPOOL_REPLAY_SECONDS until it is empty; beat
# replays it every 30 s too (`manage.py replay_settlements` by hand).
BILLING_SETTLE_WAIT_SECONDS = env_int("BILLING_SETTLE_WAIT_SECONDS", 10, minimum=1)
BILLING_SETTLEMENT_SPOOL_DIR = Path(
    env_str("BILLING_SETTLEMENT_SPOOL_DIR", str(VAR_DIR / "settlement-spool"))
)
BILLING_SPOOL_REPLAY_SECONDS = env_int("BILLING_SPOOL_REPLAY_SECONDS", 5, minimum=1)
CELERY_BEAT_SCHEDULE |= {
    "replay-spooled-settlements": {
        "task": "billing.replay_spooled_settlements",
        "schedule": 30.0,
    },
}
