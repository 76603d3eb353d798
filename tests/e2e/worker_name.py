"""`[core] hostname_callable` for the Celery test: each worker reports its own name on the tasks it runs.

Imported by every Airflow process of that test (PYTHONPATH), so it imports nothing of the project.
"""

import os
import socket


def worker_hostname() -> str:
    return os.environ.get("QA_LORA_TEST_WORKER") or socket.gethostname()
