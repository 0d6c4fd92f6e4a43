"""The web dashboard at ``/dashboard``: one static page (service/api/dashboard/) that
draws the API's own routes with plotly.js, the file the ``plotly`` Python package
ships, served from here (no CDN, works offline). The page needs no key; the data it
reads does, once keys exist (the page asks for one and keeps it in the browser)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

from service.errors import NotFound

router = APIRouter(include_in_schema=False)

HERE = Path(__file__).resolve().parent.parent / "dashboard"
FILES = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}


def plotly_js() -> Path:
    """plotly.js as the plotly package ships it (``plotly/package_data/plotly.min.js``)."""
    import plotly  # noqa: PLC0415  (only when the page is opened)

    return Path(plotly.__file__).resolve().parent / "package_data" / "plotly.min.js"


@router.get("/dashboard")
def dashboard() -> FileResponse:
    return FileResponse(HERE / "index.html", media_type="text/html")


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/dashboard")


@router.get("/dashboard/static/{name}")
def static(name: str) -> FileResponse:
    headers = {"Cache-Control": "public, max-age=3600"}
    if name == "plotly.min.js":
        return FileResponse(plotly_js(), media_type="text/javascript", headers=headers)
    if name not in FILES:
        raise NotFound("name", f"no dashboard file {name!r}")
    return FileResponse(HERE / name, media_type=FILES[name], headers=headers)
