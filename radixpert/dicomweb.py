"""A DICOMweb client (dicomweb-client) with HTTP basic or bearer credentials, for the node and the archive run."""

from __future__ import annotations

from typing import Any


def dicomweb_client(url: str, *, username: str | None = None, password: str | None = None, token: str | None = None,
                    timeout: float) -> Any:
    """A ``DICOMwebClient`` for ``url``: basic authentication when ``username`` is given, a bearer ``token`` if any."""
    from dicomweb_client.api import DICOMwebClient
    from dicomweb_client.session_utils import create_session, create_session_from_user_pass

    session = create_session_from_user_pass(username, password or "") if username else create_session()
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    return DICOMwebClient(url, session=session, timeout=timeout)
