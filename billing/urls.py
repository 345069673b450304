from django.urls import path

from billing import views

urlpatterns = [
    path("", views.dashboard, name="dashboard"),
]
