"""The answer of ``GET /workflows/{workflow_id}``, shared by the FastAPI apps."""

from __future__ import annotations

from typing import Any


async def workflow_view(workflow_id: str) -> dict[str, Any]:
    """``{"workflow_id", "status"}`` plus ``"result"`` once ``SUCCESS`` or ``"error"``
    when it failed; an unknown id is a 404 with the reason. Read from the system
    database, so runs from before a restart are answered too.
    """
    from dbos import DBOS
    from fastapi import HTTPException

    # Postgres text cannot hold NUL: no workflow has such an id, and the query would fail (500).
    status = None if "\x00" in workflow_id else await DBOS.get_workflow_status_async(workflow_id)
    if status is None:
        raise HTTPException(status_code=404, detail=f"no workflow with id {workflow_id!r}")
    view: dict[str, Any] = {"workflow_id": workflow_id, "status": status.status}
    if status.status == "SUCCESS":
        view["result"] = status.output
    elif status.error is not None:
        view["error"] = f"{type(status.error).__name__}: {status.error}"
    return view
