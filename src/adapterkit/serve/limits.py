"""The server's limits (ServeConfig) and the request checks every endpoint shares."""

from __future__ import annotations

from dataclasses import dataclass

from adapterkit.core.errors import AdapterKitError
from adapterkit.serve.requests import ApiError
from adapterkit.serve.store import BASE_NAME, AdapterStore, check_name

BATCHING = ("continuous", "request")


@dataclass(frozen=True)
class ServeConfig:
    """Limits and batching options of one server."""

    max_batch: int = 16  # rows per model call
    max_wait_ms: float = 5.0  # how long the oldest row waits for others to join its batch (while none runs)
    max_queue: int = 256  # rows waiting; more answers 503
    timeout_s: float = 60.0  # per request; later answers 504
    max_input_tokens: int = 512  # per prompt / input text; more answers 413
    max_tokens: int = 256  # largest ``max_tokens`` a completion may ask for
    max_body_bytes: int = 1 << 20  # request body; more answers 413
    # causal LMs: "continuous" (rows join and leave the running batch at every decode step) or "request" (a batch
    # runs to its longest row before the next one forms); classifiers always batch per request
    batching: str = "continuous"

    def __post_init__(self) -> None:
        if self.batching not in BATCHING:
            raise AdapterKitError(f"batching must be one of {', '.join(BATCHING)}, got {self.batching!r}")


def adapter_of(name: str, store: AdapterStore) -> str | None:
    """The adapter a request's ``model`` names (None: the base model); 400 for a bad name, 404 an unknown one."""
    if name == BASE_NAME:
        return None
    store.get(check_name(name))
    return name


def bounded(items: list[str], what: str, config: ServeConfig) -> list[str]:
    """``items`` if one request may hold that many rows (400 for none, 413 for more than can ever run)."""
    if not items:
        raise ApiError(400, f"{what}: empty list")
    if len(items) > config.max_batch:
        raise ApiError(413, f"{what}: {len(items)} items in one request; at most {config.max_batch}")
    if len(items) > config.max_queue:  # it could never be queued whole: a 503 would ask for retries forever
        raise ApiError(413, f"{what}: {len(items)} items in one request; the queue holds at most "
                            f"{config.max_queue} rows")
    return items


def check_length(ids: tuple[int, ...], what: str, config: ServeConfig, positions: int | None = None) -> None:
    """400 for an empty text; 413 past ``max_input_tokens`` (or ``positions``, all a classifier sees)."""
    if not ids:
        raise ApiError(400, f"{what}: empty (no tokens)")
    limit = min(config.max_input_tokens, positions or config.max_input_tokens)
    if len(ids) > limit:
        raise ApiError(413, f"{what}: {len(ids)} tokens; this server takes at most {limit}")


def usage(prompt: int, completion: int) -> dict[str, int]:
    """OpenAI's usage object."""
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
