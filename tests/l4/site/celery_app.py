"""The Celery app quartet_capture's shared tasks bind to.

No broker runs next to the test QU4RTET: CELERY_TASK_ALWAYS_EAGER (settings.py)
makes `.delay()` run the task inline, so a capture posted without
`run-immediately=true` is still parsed instead of staying QUEUED for ever.
"""

from celery import Celery

app = Celery("linectl_q4")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.set_default()
