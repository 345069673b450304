import pytest


@pytest.mark.django_db
def test_the_home_page_names_the_api_base_url(client):
    response = client.get("/")

    assert response.status_code == 200
    assert "http://testserver/v1" in response.content.decode()
