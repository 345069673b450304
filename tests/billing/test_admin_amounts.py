"""The operator's admin refuses the negative amounts the pages refuse: a spend cap or a
low-balance threshold below zero means nothing."""

from __future__ import annotations

import pytest

from billing.models import BillingAlertSettings, SpendCap
from tests.factories import make_key, make_org

pytestmark = pytest.mark.django_db


def test_a_negative_spend_cap_is_refused(admin_client):
    key, _ = make_key(make_org())

    response = admin_client.post(
        "/admin/billing/spendcap/add/", {"api_key": key.pk, "amount_usd": "-5", "window": "month"}
    )

    assert response.status_code == 200
    assert not SpendCap.objects.exists()


def test_a_negative_low_balance_threshold_is_refused(admin_client):
    organization = make_org()

    response = admin_client.post(
        "/admin/billing/billingalertsettings/add/",
        {"organization": organization.pk, "billing_email": "", "low_balance_threshold_usd": "-1"},
    )

    assert response.status_code == 200
    assert not BillingAlertSettings.objects.exists()
