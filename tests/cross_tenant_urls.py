"""A URLconf with one route the cross-tenant matrix does not know (tests/test_cross_tenant.py)."""

from django.http import HttpResponse
from django.urls import include, path


def _view(request, thing_id):
    return HttpResponse()


urlpatterns = [
    path("", include("portal.urls")),
    path("things/<int:thing_id>/", _view, name="new_thing"),
]
