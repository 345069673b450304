"""Receivers of other apps' signals; each calls one service."""

from __future__ import annotations

from typing import Any

from allauth.account.signals import user_signed_up
from django.dispatch import receiver
from django.http import HttpRequest

from portal.models import User
from portal.services import organization_create_personal


@receiver(user_signed_up, dispatch_uid="portal.personal_organization")
def create_personal_organization(
    sender: Any, request: HttpRequest, user: User, **kwargs: Any
) -> None:
    organization_create_personal(user=user)
