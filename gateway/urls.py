from django.urls import path, re_path

from gateway import messages_view, views

urlpatterns = [
    path("chat/completions", views.chat_completions),
    path("completions", views.completions),
    path("embeddings", views.embeddings),
    path("messages", messages_view.messages),
    path("models", views.models),
    path("models/<path:model_id>", views.model),
    re_path(r"^(?P<path>.*)$", views.unknown_endpoint),
]
