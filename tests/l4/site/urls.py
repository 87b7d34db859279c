"""URL map of the test QU4RTET.

quartet_integrations is mounted last and at the root: its patterns are not
anchored (r"guardian/NumberRangeService/?" would match inside other paths).
"""

from django.urls import include, re_path

import celery_app  # noqa: F401  (binds quartet_capture's shared tasks, eager)

urlpatterns = [
    re_path(r"^serialbox/", include("serialbox.api.urls")),
    re_path(r"^capture/", include("quartet_capture.urls", namespace="quartet-capture")),
    re_path(r"^epcis/", include("quartet_epcis.urls", namespace="quartet-epcis")),
    re_path(r"^templates/", include("quartet_templates.urls")),
    re_path(r"^output/", include("quartet_output.urls")),
    re_path(r"^masterdata/", include("quartet_masterdata.urls")),
    re_path(r"^", include("quartet_integrations.urls")),
]
