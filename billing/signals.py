"""Receivers of portal's signals; each calls one billing service."""

from __future__ import annotations

from typing import Any

from django.dispatch import receiver

from billing.services import spend_cap_copy
from portal.models import ApiKey
from portal.services import api_key_rotated


@receiver(api_key_rotated, dispatch_uid="billing.copy_spend_cap_on_rotation")
def copy_spend_cap_on_rotation(sender: Any, old: ApiKey, new: ApiKey, **kwargs: Any) -> None:
    spend_cap_copy(from_key=old, to_key=new)
