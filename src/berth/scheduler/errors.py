"""Errors of the scheduler, grouped by what the caller (the Marathon API) decides.

``UnknownApp``/``UnknownTask``/``UnknownDeployment``: 404. ``AppExists``: 409.
``AppLocked``: 409 with the blocking deployments, retry with ``force``.
``UnsupportedApp``: 422, the definition is valid Marathon but this driver
cannot run it. ``LaunchFailed``: the driver could not start a task (the task
fails and the app backs off; never raised to API callers).
"""

from __future__ import annotations


class SchedulerError(Exception):
    pass


class UnknownApp(SchedulerError, LookupError):
    def __init__(self, app_id: str) -> None:
        super().__init__(f"App '{app_id}' does not exist")
        self.app_id = app_id


class UnknownTask(SchedulerError, LookupError):
    def __init__(self, task_id: str) -> None:
        super().__init__(f"Task '{task_id}' does not exist")
        self.task_id = task_id


class UnknownDeployment(SchedulerError, LookupError):
    def __init__(self, deployment_id: str) -> None:
        super().__init__(f"DeploymentPlan {deployment_id} does not exist")
        self.deployment_id = deployment_id


class AppExists(SchedulerError, ValueError):
    def __init__(self, app_id: str) -> None:
        super().__init__(f"An app with id [{app_id}] already exists.")
        self.app_id = app_id


class AppLocked(SchedulerError, RuntimeError):
    def __init__(self, deployment_ids: list[str]) -> None:
        super().__init__(
            "App is locked by one or more deployments. "
            "Override with the option '?force=true'. "
            "View details at '/v2/deployments/<DEPLOYMENT_ID>'."
        )
        self.deployment_ids = deployment_ids


class UnsupportedApp(SchedulerError, ValueError):
    """Valid for Marathon, but the process driver cannot run it (422)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path
        self.message = message


class LaunchFailed(SchedulerError, OSError):
    pass
