from argparse import ArgumentParser
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml
from django.core.management.base import BaseCommand, CommandError

from gateway.services import CatalogError, catalog_load


class _ExactLoader(yaml.SafeLoader):
    """A YAML loader that reads numbers with a fraction as Decimal, never float, so an
    unquoted price like 0.50 keeps its exact value."""


class _NotFinite(ValueError):
    """A YAML float that is no decimal number (.nan, .inf), named with its line."""


def _construct_decimal(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Decimal:
    text = str(loader.construct_scalar(node)).replace("_", "")
    try:
        value = Decimal(text)
    except ArithmeticError:  # YAML's .nan and .inf are no Decimal literals
        value = None
    if value is None or not value.is_finite():
        line = node.start_mark.line + 1
        raise _NotFinite(f"line {line}: {text!r} is not a finite decimal number")
    return value


_ExactLoader.add_constructor("tag:yaml.org,2002:float", _construct_decimal)


class Command(BaseCommand):
    help = "Create or update providers and models from a catalog YAML file (idempotent)."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("path", type=Path)

    def handle(self, *args: Any, path: Path, **options: Any) -> None:
        try:
            data = yaml.load(path.read_text(encoding="utf-8"), Loader=_ExactLoader)  # noqa: S506
        except OSError as exc:
            raise CommandError(f"cannot read {path}: {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise CommandError(f"{path} is not UTF-8 text (byte {exc.start})") from None
        except _NotFinite as exc:
            raise CommandError(f"{path}: {exc}") from None
        except (yaml.YAMLError, ArithmeticError) as exc:
            raise CommandError(f"{path} is not valid YAML: {exc}") from None
        try:
            report = catalog_load(data=data)
        except CatalogError as exc:
            raise CommandError(f"{path}: {exc}") from None
        for label, items in [
            ("created", report.created),
            ("updated", report.updated),
            ("unchanged", report.unchanged),
            ("not in the file, kept", report.not_in_file),
        ]:
            for item in items:
                self.stdout.write(f"{label}: {item}")
