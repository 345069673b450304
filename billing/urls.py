from django.urls import path

from billing import usage_views, views

urlpatterns = [
    path("", views.dashboard, name="dashboard"),
    path("usage/", usage_views.usage_page, name="usage"),
    path("usage/log", usage_views.usage_log_page, name="usage_log"),
    path("usage/log.csv", usage_views.usage_log_csv, name="usage_log_csv"),
]
