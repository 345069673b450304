from django.urls import path

from billing import topup_views, views

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
]
