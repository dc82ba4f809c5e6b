"""A Label Studio server's API, the little of it that pulling answers needs (stdlib HTTP only).

Label Studio takes two kinds of token: a personal access token (a JWT, the default since 1.18),
exchanged for a short-lived access token at ``/api/token/refresh/`` and sent as ``Bearer``, and a
legacy token sent as ``Token`` (where the organisation still allows them). The token is only ever
held in memory: it is never written, logged, or put in an error message.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request

TOKEN_VARIABLE = "LABEL_STUDIO_API_KEY"
TIMEOUT_S = 60


class LabelStudioError(RuntimeError):
    """The server could not be reached or refused a request (the message never holds the token)."""


class LabelStudio:
    def __init__(self, url: str, token: str):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"label_studio_url must start with http:// or https://, not {url!r}")
        if not token:
            raise ValueError(f"no Label Studio token: set the environment variable {TOKEN_VARIABLE} (Label Studio: "
                             f"Account & Settings > Personal Access Token)")
        self.url = url.rstrip("/")
        # an opener of its own, with the environment's proxies as they are now (urllib's shared default
        # opener keeps the proxies of its first use in the process)
        self._opener = urllib.request.build_opener()
        self._token = token
        self._authorization: str | None = None

    def _request(self, path: str, data: dict | None = None, authorize: bool = True):
        headers = {"Accept": "application/json"}
        body = None
        if data is not None:
            body, headers["Content-Type"] = json.dumps(data).encode(), "application/json"
        if authorize:
            headers["Authorization"] = self._auth()
        request = urllib.request.Request(self.url + path, data=body, headers=headers)
        try:
            with self._opener.open(request, timeout=TIMEOUT_S) as response:
                return json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")[:300]
            raise LabelStudioError(f"Label Studio at {self.url} answered {exc.code} to {path.split('?')[0]}: "
                                   f"{detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise LabelStudioError(f"Label Studio at {self.url} could not be reached: {reason}") from None
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise LabelStudioError(f"Label Studio at {self.url} sent no JSON for {path.split('?')[0]} "
                                   f"(is label_studio_url the server's address?)") from None

    def _auth(self) -> str:
        if self._authorization is None:
            if self._token.count(".") == 2:  # a JWT: a personal access token, exchanged for an access token
                access = self._request("/api/token/refresh/", {"refresh": self._token}, authorize=False)["access"]
                self._authorization = f"Bearer {access}"
            else:
                self._authorization = f"Token {self._token}"
        return self._authorization

    def export(self, project: int) -> list[dict]:
        """The project's tasks with their answers, in Label Studio's JSON export format (tasks with no
        answer are left out, as in its own export)."""
        tasks = self._request(f"/api/projects/{int(project)}/export?exportType=JSON")
        if not isinstance(tasks, list):
            raise LabelStudioError(f"Label Studio at {self.url}: project {project}'s export is not a list of tasks")
        return tasks

    def user_names(self) -> dict[int, str]:
        """User id -> e-mail (or username), to name checkers; {} where the token may not list users."""
        try:
            users = self._request("/api/users/")
        except LabelStudioError:
            return {}
        users = users.get("results", []) if isinstance(users, dict) else users
        return {int(u["id"]): str(u.get("email") or u.get("username") or u["id"]) for u in users if "id" in u}
