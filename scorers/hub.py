"""Loading weights by hub id or local path, with an error that says why a hub id could not be loaded.

Shared by the scorers and by ``diffusion_dpo`` (pipelines, components, language models). A hub id is looked
up in the local cache first, so a cached model loads without a request. When it is not cached, the error names
the id and the option that takes a local path instead, and says which of these it is:

    not in the local cache, and offline mode is on (HF_HUB_OFFLINE) or the hub cannot be reached
    no such repo on the hub (it answered 404)
    any other failure to fetch it (the hub client's reason, shortened)

This module imports nothing of ``diffusion_dpo``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, TypeVar

from scorers.errors import InputError

T = TypeVar("T")


def hub_offline() -> bool:
    """Whether the user asked for offline mode now (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE).

    Read from the environment at each call: huggingface_hub reads it once at import, so a variable set
    later (a test, a notebook) would otherwise still let it retry the network for half a minute.
    """
    return any(os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")
               for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_errors() -> tuple[type[BaseException], ...]:
    """What the transformers, diffusers and huggingface_hub loaders raise for a missing or unreadable model."""
    from huggingface_hub import errors

    return (OSError, ValueError, errors.HfHubHTTPError)


def why(e: BaseException) -> str:
    """An exception's message on one line, at most 300 characters."""
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:297] + "..."


def looks_local(name: str) -> bool:
    """Whether ``name`` means a local path: it exists, or it is written as one (./x, ../x, /x, ~/x, or with
    more than one slash, which no hub id ``org/name`` has)."""
    return Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or name.count("/") > 1


def load_pretrained(cls, name: str, *, option: str, what: str, method: str = "from_pretrained", **kwargs):
    """``cls.<method>(name, **kwargs)`` (``from_pretrained`` unless told, e.g. ``load_config``) for a local
    folder or a hub id; failure -> InputError naming the folder or id tried and the ``option`` that takes a
    local folder instead."""
    load = getattr(cls, method)
    if looks_local(name):
        local = Path(name).expanduser()
        if not local.exists():
            raise InputError(f"cannot load the {what}: local folder {name} (option {option}=) does not exist")
        try:
            return load(str(local), **kwargs)
        except hub_errors() as e:
            raise InputError(f"cannot load the {what} from local folder {name} (option {option}=): {why(e)}") from None
    return from_hub(lambda local_only: load(name, local_files_only=local_only, **kwargs),
                    what, f"hub id {name!r}", option, "a local folder")


def hub_file(repo_id: str, filename: str, *, option: str, what: str) -> str:
    """Local path of ``filename`` from hub repo ``repo_id`` (downloaded once, then cached)."""
    from huggingface_hub import hf_hub_download

    return from_hub(lambda local_only: hf_hub_download(repo_id, filename, local_files_only=local_only),
                    what, f"hub file {repo_id}/{filename}", option, "a local file")


def from_hub(load: Callable[[bool], T], what: str, tried: str, option: str, local: str = "a local folder") -> T:
    """``load(local_only)`` from the hub cache, else (unless offline) from the hub; InputError otherwise.

    ``tried`` names what was asked for (``hub id 'org/name'``), ``option`` the config key or option that takes
    ``local`` (a local folder or file) instead. The cache comes first so a cached model loads without any
    request. Before going online, one TCP connection to the hub's host tells within seconds whether it can be
    reached at all; without that, the hub client retries every file for minutes on a machine without network.
    """
    try:
        return load(True)
    except hub_errors():
        pass
    instead = f"Download it where the hub is reachable, or pass {local} with {option}=PATH"
    reason = "offline mode is on (HF_HUB_OFFLINE is set)" if hub_offline() else _hub_unreachable()
    if reason:
        raise InputError(f"cannot load the {what}: {tried} is not in the local hub cache, and {reason}. "
                         f"{instead}") from None
    try:
        return load(False)
    except hub_errors() as e:
        if _no_such_repo(e):
            raise InputError(f"cannot load the {what}: {tried}: no such repo on the hub (it answered 404; check "
                             f"the id, a private repo needs `hf auth login`), or pass {local} with {option}=PATH"
                             ) from None
        raise InputError(f"cannot load the {what}: {tried}, which could not be fetched from the hub: "
                         f"{why(e)}. Check the id, or pass {local} with {option}=PATH") from None


def _no_such_repo(e: BaseException | None) -> bool:
    """Whether the hub said the repo does not exist, anywhere in the chain of exceptions the loaders wrap."""
    from huggingface_hub import errors

    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, errors.RepositoryNotFoundError) and not isinstance(e, errors.GatedRepoError):
            return True
        e = e.__cause__ or e.__context__
    return False


def _hub_unreachable() -> str | None:
    """Why the hub cannot be reached (its host does not resolve or refuses a connection within 5 s), or
    None when it can. With a proxy configured only the hub client can tell, so this says None."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    proxies = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
    if any(os.environ.get(var) for var in proxies):
        return None
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=5):
            return None
    except OSError as e:
        return f"the hub ({host}) cannot be reached from here: {e}"
