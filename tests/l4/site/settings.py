"""Django settings for the QU4RTET instance linectl's tests run as their L4.

Written for linectl (not taken from QU4RTET). The process runs from its own
virtualenv (build/qu4rtet-venv); nothing here is imported by linectl.

Environment (set by tests/l4/harness.py):
  Q4_DB     path of the SQLite database (copied per session from a
            pre-migrated template)
  Q4_MEDIA  directory where quartet_capture stores posted messages
"""

import os
from pathlib import Path

SITE_DIR = Path(__file__).resolve().parent

SECRET_KEY = "linectl-tests-only-not-secret"
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "django_filters",
    "serialbox",
    # explicit configs: apps.py also imports serialbox's FlavorPackApp, so Django
    # cannot pick the config by itself and serialbox then finds no flavor pack
    "random_flavorpack.apps.RandomFlavorpackConfig",
    "list_based_flavorpack.apps.ListBasedFlavorpackConfig",
    "quartet_capture",
    "quartet_epcis",
    "quartet_output",
    "quartet_templates",
    "quartet_masterdata",
    "quartet_integrations",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]

ROOT_URLCONF = "urls"

TEMPLATES = [
    {
        # quartet_integrations serves the TraceLink WSDL from its app templates.
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("Q4_DB", str(SITE_DIR / "q4.sqlite3")),
        # the seed script writes while the server runs: wait for the lock
        "OPTIONS": {"timeout": 30},
    }
}

# Without it Django wants new migrations inside site-packages.
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

MEDIA_ROOT = os.environ.get("Q4_MEDIA", str(SITE_DIR / "media"))
STATIC_URL = "/static/"

USE_TZ = True
TIME_ZONE = "UTC"
LANGUAGE_CODE = "en-us"

# quartet_integrations' SOAP views read this attribute directly.
LOGGING_LEVEL = os.environ.get("Q4_LOGGING_LEVEL", "WARNING")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": LOGGING_LEVEL},
}

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": (
        "rest_framework.authentication.BasicAuthentication",
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ),
    "DEFAULT_PERMISSION_CLASSES": ("rest_framework.permissions.IsAuthenticated",),
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.LimitOffsetPagination",
    "PAGE_SIZE": 100,
    "DEFAULT_FILTER_BACKENDS": ("django_filters.rest_framework.DjangoFilterBackend",),
}

# quartet_capture queues its tasks through Celery (shared_task .delay()).
# No broker here: run them in the request (celery_app.py reads these).
CELERY_TASK_ALWAYS_EAGER = True
CELERY_TASK_EAGER_PROPAGATES = False
CELERY_BROKER_URL = "memory://"
CELERY_RESULT_BACKEND = "cache+memory://"
