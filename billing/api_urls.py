"""The management API's billing endpoints, mounted under /api/v1/ (portal's: portal/api_urls.py)."""

from django.urls import path

from billing import api

ORG = "organizations/<slug:organization>"

urlpatterns = [
    path("key", api.CallingKey.as_view(), name="api_v1_calling_key"),
    path(f"{ORG}/balance/", api.Balance.as_view(), name="api_v1_balance"),
    path(f"{ORG}/usage/", api.Usage.as_view(), name="api_v1_usage"),
    path(f"{ORG}/requests/", api.RequestLog.as_view(), name="api_v1_requests"),
    path(f"{ORG}/statements/", api.StatementList.as_view(), name="api_v1_statements"),
    path(
        f"{ORG}/statements/<int:statement_id>/",
        api.StatementDetail.as_view(),
        name="api_v1_statement",
    ),
    path(
        f"{ORG}/statements/<int:statement_id>/csv/",
        api.StatementCsv.as_view(),
        name="api_v1_statement_csv",
    ),
    path(
        f"{ORG}/statements/<int:statement_id>/pdf/",
        api.StatementPdf.as_view(),
        name="api_v1_statement_pdf",
    ),
    path(
        f"{ORG}/keys/<int:key_id>/spend-cap/",
        api.ApiKeySpendCap.as_view(),
        name="api_v1_key_spend_cap",
    ),
]
