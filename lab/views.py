"""Reading one workflow for an HTTP answer, shared by the FastAPI apps.

``find_workflow`` is the one lookup every ``/workflows/{workflow_id}...`` route uses:
it answers 404 for an id no workflow has (or one of another workflow function), and
never sends the database an id it cannot store. ``workflow_view`` is the answer of
``GET /workflows/{workflow_id}`` for the apps that show any workflow.
"""

from __future__ import annotations

from typing import Any

from dbos import DBOS, WorkflowStatus
from fastapi import HTTPException


async def find_workflow(
    workflow_id: str,
    *,
    name: str | None = None,
    what: str = "workflow",
    load_input: bool = True,
    load_output: bool = True,
) -> WorkflowStatus:
    """The workflow ``workflow_id`` from the system database (so runs from before a
    restart are found too); when ``name`` is given it must be a run of that workflow
    function. Otherwise a 404 whose detail is ``no <what> with id '<id>'``.
    """
    # Postgres text cannot hold NUL: no workflow has such an id, and the query would fail (500).
    found = (
        []
        if "\x00" in workflow_id
        else await DBOS.list_workflows_async(
            workflow_ids=[workflow_id], load_input=load_input, load_output=load_output
        )
    )
    if not found or (name is not None and found[0].name != name):
        raise HTTPException(status_code=404, detail=f"no {what} with id {workflow_id!r}")
    return found[0]


async def workflow_view(workflow_id: str) -> dict[str, Any]:
    """``{"workflow_id", "status"}`` plus ``"result"`` once ``SUCCESS`` or ``"error"``
    when it failed; an unknown id is a 404 with the reason.
    """
    status = await find_workflow(workflow_id, load_input=False)
    view: dict[str, Any] = {"workflow_id": workflow_id, "status": status.status}
    if status.status == "SUCCESS":
        view["result"] = status.output
    elif status.error is not None:
        view["error"] = f"{type(status.error).__name__}: {status.error}"
    return view
