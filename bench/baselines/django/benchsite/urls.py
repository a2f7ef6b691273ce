"""HTTP routes of the Django Channels baseline."""

from django.urls import path

from . import views

urlpatterns = [
    path("healthz", views.healthz),
    path("api/v1/notifications/<str:user_id>", views.publish_notification),
    path("api/v1/orgs/<str:org_id>/events", views.publish_org_event),
    path("api/chat/generate-response/", views.generate_response),
]
