"""The root of the HTTP role's site: mounting resources at a path, guarded or public."""

from __future__ import annotations

from typing import Any

from twisted.web.resource import Resource

from mailgw.http.guard import Access, AdminGuard


class NotFound(Resource):
    """404 in plain text (for every path below it too)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]

    def render(self, request: Any) -> bytes:
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"" if request.method == b"HEAD" else b"404 Not Found\n"


class Folder(Resource):
    """A path segment holding mounted resources: 404 itself and for unknown children."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]

    def getChild(self, path: bytes, request: Any) -> Resource:  # noqa: N802 (twisted.web)
        return NotFound()

    def render(self, request: Any) -> bytes:
        return NotFound().render(request)


class HTTPRoot(Folder):
    """The site's root resource; ``mount`` puts a resource at a path (see ``mailgw.http``).
    ``/`` itself and unknown paths answer 404, unless a resource is mounted at ``/`` (the
    webmail): it then answers ``/`` and every path no other mount holds."""

    def __init__(self, access: Access) -> None:
        super().__init__()
        self.access = access
        self.fallback: Resource | None = None

    def getChild(self, path: bytes, request: Any) -> Resource:  # noqa: N802 (twisted.web)
        if self.fallback is not None:
            return self.fallback
        return NotFound()

    def render(self, request: Any) -> Any:
        if self.fallback is not None:
            return self.fallback.render(request)  # type: ignore[no-untyped-call]
        return NotFound().render(request)

    def mount(self, path: str, resource: Resource, guarded: bool = True) -> Resource:
        """Serve ``resource`` at ``path`` (``/readyz``, ``/api/v1``), behind the admin guard
        unless ``guarded`` is False; returns what was mounted (the guard or the resource).
        ValueError for an empty path or a path already mounted."""
        segments = [s.encode("utf-8") for s in path.strip("/").split("/") if s]
        if not segments:
            if path != "/":
                raise ValueError("mount needs a path")
            if self.fallback is not None:
                raise ValueError("/ is mounted already")
            self.fallback = AdminGuard(resource, self.access) if guarded else resource
            return self.fallback
        node: Resource = self
        for segment in segments[:-1]:
            child = node.children.get(segment)
            if child is None:
                child = Folder()
                node.putChild(segment, child)
            elif not isinstance(child, Folder):
                raise ValueError(f"{path}: {segment.decode()} is a mounted resource already")
            node = child
        if segments[-1] in node.children:
            raise ValueError(f"{path} is mounted already")
        mounted = AdminGuard(resource, self.access) if guarded else resource
        node.putChild(segments[-1], mounted)
        return mounted
