"""The one error of the request path: what the caller did wrong, as an HTTP status."""


class RequestError(ValueError):
    """A request the model cannot answer: ``status`` (4xx) and a ``detail`` for the caller."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
