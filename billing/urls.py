from django.urls import path

from billing import statement_views, views

urlpatterns = [
    path("", views.dashboard, name="dashboard"),
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
]
