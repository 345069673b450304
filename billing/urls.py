from django.urls import path

from billing import key_pages, views

urlpatterns = [
    path("", views.dashboard, name="dashboard"),
]

# One API key's page (it shows money: its spend and cap); mounted under /dashboard/.
urlpatterns += [path("keys/<int:api_key_id>/", key_pages.api_key_detail, name="api_key")]
