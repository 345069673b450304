import pytest

from tests.portal.api_helpers import Team, make_team


@pytest.fixture
def team(db) -> Team:
    return make_team()
