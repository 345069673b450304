from django.urls import path

from billing import key_pages, statement_views, topup_views, usage_views, views

urlpatterns = [
    path("", views.dashboard, name="dashboard"),
    path("credit/", topup_views.add_credit, name="add_credit"),
    path("credit/pay", topup_views.add_credit_pay, name="add_credit_pay"),
    path(
        "credit/payments/<str:payment_intent_id>",
        topup_views.add_credit_status,
        name="add_credit_status",
    ),
    path("credit/auto-topup", topup_views.auto_topup, name="auto_topup"),
    path("credit/auto-topup/card", topup_views.auto_topup_card, name="auto_topup_card"),
    path("statements/", statement_views.statement_list, name="statement_list"),
    path(
        "statements/alerts",
        statement_views.billing_alert_settings_view,
        name="billing_alert_settings",
    ),
    path(
        "statements/<int:statement_id>/",
        statement_views.statement_detail,
        name="statement_detail",
    ),
    path(
        "statements/<int:statement_id>.csv",
        statement_views.statement_csv_download,
        name="statement_csv",
    ),
    path(
        "statements/<int:statement_id>.pdf",
        statement_views.statement_pdf_download,
        name="statement_pdf",
    ),
    path("usage/", usage_views.usage_page, name="usage"),
    path("usage/log", usage_views.usage_log_page, name="usage_log"),
    path("usage/log.csv", usage_views.usage_log_csv, name="usage_log_csv"),
]

# One API key's page (it shows money: its spend and cap); mounted under /dashboard/.
urlpatterns += [path("keys/<int:api_key_id>/", key_pages.api_key_detail, name="api_key")]
