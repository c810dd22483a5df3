"""``vllm-otel dashboards push``: upload the dashboards to a running Grafana with grafana-client.

Idempotent: each dashboard is saved by its fixed uid with ``overwrite``, into one folder that is
created when missing. Errors a user can act on (bad token, missing permission, a clash, no server)
become one clear line and exit status 2; nothing is half-written beyond the dashboards already
saved, which a re-run overwrites.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

__all__ = ["PushError", "push", "add_push_parser"]


class PushError(RuntimeError):
    pass


def _explain(e: Exception, url: str, what: str) -> PushError:
    from grafana_client.client import GrafanaException, GrafanaTimeoutError

    if isinstance(e, GrafanaTimeoutError):
        return PushError(f"Grafana at {url} did not answer in time while {what}")
    if isinstance(e, GrafanaException):
        code = e.status_code
        hint = {401: "the token was rejected: check --token-file (a service-account token)",
                403: "the token lacks permission: it needs the Editor role (or folder write access)",
                412: "Grafana refused the save (412 precondition failed): a dashboard of the same "
                     "title exists in that folder with another uid; rename or delete it"}.get(code)
        if hint:
            return PushError(f"{what}: HTTP {code}: {hint}")
        if code == 0:
            return PushError(f"cannot reach Grafana at {url} while {what}: {e.message}")
        return PushError(f"{what}: HTTP {code}: {e.message}")
    return PushError(f"cannot reach Grafana at {url} while {what}: {type(e).__name__}: {e}")


def _folder_uid(name: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:40] or "vllm-otel"


def push(url: str, token: str, dashboards: dict[str, dict[str, Any]], folder: str = "vLLM",
         timeout_s: float = 10.0) -> list[dict[str, Any]]:
    from grafana_client import GrafanaApi

    api = GrafanaApi.from_url(url, credential=token, timeout=timeout_s)

    def call(what: str, fn: Any, *a: Any, **kw: Any) -> Any:
        try:
            return fn(*a, **kw)
        except Exception as e:  # noqa: BLE001 - mapped to one actionable message
            raise _explain(e, url, what) from e

    folders = call("listing folders", api.folder.get_all_folders) or []
    match = next((f for f in folders if f.get("title") == folder), None)
    if match is None:
        match = call(f"creating folder {folder!r}", api.folder.create_folder, folder, uid=_folder_uid(folder))
    folder_uid = match["uid"]
    out = []
    for name, dash in dashboards.items():
        body = {"dashboard": {**dash, "id": None}, "folderUid": folder_uid, "overwrite": True,
                "message": "vllm-otel dashboards push"}
        r = call(f"saving {dash['uid']}", api.dashboard.update_dashboard, body) or {}
        out.append({"file": name, "uid": dash["uid"], "title": dash["title"], "folder": folder,
                    "status": r.get("status", "success"), "version": r.get("version"),
                    "url": url.rstrip("/") + str(r.get("url", f"/d/{dash['uid']}"))})
    return out


def _load(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    if args.dir:
        files = sorted(Path(args.dir).glob("*.json"))
        if not files:
            raise PushError(f"no *.json dashboards in {args.dir}")
        out = {}
        for f in files:
            try:
                out[f.name] = json.loads(f.read_text())
            except ValueError as e:
                raise PushError(f"{f}: not JSON: {e}") from None
        return out
    from vllm_otel.dashboards.build import build_all

    return build_all()


def cmd_push(args: argparse.Namespace) -> int:
    try:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as e:
            raise PushError(f"cannot read --token-file: {e.strerror}: {args.token_file}") from None
        if not token:
            raise PushError(f"--token-file {args.token_file} is empty")
        result = push(args.grafana_url, token, _load(args), folder=args.folder, timeout_s=args.timeout)
    except PushError as e:
        print(f"vllm-otel dashboards push: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for r in result:
            print(f"{r['status']:8} {r['title']} -> {r['url']}")
    return 0


def add_push_parser(sp: argparse._SubParsersAction) -> None:
    p = sp.add_parser("push", help="upload the dashboards to Grafana (idempotent, by uid)",
                      description="Save the four dashboards into a Grafana folder through its HTTP "
                                  "API, overwriting earlier copies with the same uid.")
    p.add_argument("--grafana-url", required=True, help="e.g. http://grafana:3000")
    p.add_argument("--token-file", required=True,
                   help="file holding a Grafana service-account token (Editor role)")
    p.add_argument("--folder", default="vLLM", help="folder title (created when missing; default %(default)s)")
    p.add_argument("--dir", help="push the *.json files of this folder instead of the built-in dashboards")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per request (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_push)
